"""Label-free monitoring in a real `hndsr serve` (hndsr/monitoring.py, serving/drift.py): the figures of each
answer in its headers, the reference on /v1/model, the drift gauge moving with what clients send, and the drift
alert firing in promtool on the values the server exported."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from hndsr import monitoring
from hndsr.checkpoint import STAGES, load_model, weights_hash
from hndsr.images import decode_rgb, encode_png
from tests.serving.test_server import Server, post, write_model

pytestmark = pytest.mark.slow

RULES = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "rules" / "hndsr.rules.yml"
WINDOW = 30  # requests in the drift window (HNDSR_DRIFT_WINDOW_REQUESTS): one phase of the test fills it
EDGE = 64


def realsat_images(realsat: Path) -> list[np.ndarray]:
    return [decode_rgb(path.read_bytes(), max_pixels=10**8) for path in sorted(realsat.glob("*.png"))]


def write_reference(models: Path, images: list[np.ndarray], scale: float = 2.0) -> dict:
    """models/reference.json as the pipeline writes it, for a model 'trained' on `images`: their input histograms
    and the model's consistency on crops of them."""
    values = [image.astype(np.float32) / 255 for image in images]
    counts = sum(monitoring.band_counts(v) for v in values)
    model = load_model(models)
    psnrs = []
    with torch.inference_mode():
        for v in values:
            crop = v[:EDGE, :EDGE]
            output = model.super_resolve(torch.from_numpy(crop).permute(2, 0, 1)[None], scale, steps=0)
            psnrs.append(monitoring.consistency(output[0].permute(1, 2, 0).numpy(), crop, None, scale)[0])
    record = {"format_version": monitoring.FORMAT_VERSION,
              "input": monitoring.input_reference(counts, ["red", "green", "blue"], f"{len(images)} test images"),
              "consistency": {"psnr_db": monitoring.distribution(psnrs, monitoring.CONSISTENCY_EDGES),
                              "computed_on": "test crops"},
              "models": {stage: weights_hash(models / stage) for stage in STAGES}}
    (models / monitoring.REFERENCE_FILE).write_text(json.dumps(record))
    return record


def crops(images: list[np.ndarray], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` crops of EDGE px, each from an image drawn in proportion to its area (as the reference weighs them)."""
    rng = np.random.default_rng(seed)
    area = np.array([i.shape[0] * i.shape[1] for i in images], dtype=np.float64)
    chosen = []
    for k in rng.choice(len(images), count, p=area / area.sum()):
        image = images[k]
        y, x = rng.integers(0, image.shape[0] - EDGE + 1), rng.integers(0, image.shape[1] - EDGE + 1)
        chosen.append(image[y : y + EDGE, x : x + EDGE])
    return chosen


def darkened(image: np.ndarray) -> np.ndarray:
    return (image // 2).astype(np.uint8)


def stretched(image: np.ndarray) -> np.ndarray:
    """A 2-98 % contrast stretch per band, as 16-bit imagery is often rendered to 8 bits."""
    low, high = np.percentile(image, [2, 98], axis=(0, 1))
    return np.clip((image - low) / np.maximum(high - low, 1) * 255, 0, 255).round().astype(np.uint8)


def gauge(text: str, name: str) -> dict[str, float]:
    """{band: value} of a gauge labelled by band in /metrics text."""
    return {m[0]: float(m[1]) for m in re.findall(rf'^{name}{{[^}}]*band="([^"]+)"[^}}]*}} (\S+)$', text, re.M)}


def test_each_answer_carries_its_figures_and_the_drift_gauge_follows_what_clients_send(tmp_path, realsat):
    models = write_model(tmp_path / "models", seed=0, local=True)
    images = realsat_images(realsat)
    reference = write_reference(models, images)
    s = Server({"MODEL_URI": str(models), "HNDSR_DRIFT_WINDOW_REQUESTS": str(WINDOW)}, tmp_path)
    s.wait_ready()
    try:
        info = httpx.get(f"{s.url}/v1/model").json()
        assert [b["name"] for b in info["reference"]["input"]["bands"]] == ["red", "green", "blue"]
        assert info["reference"]["consistency_psnr_db"]["p50"] == reference["consistency"]["psnr_db"]["p50"]

        traffic = crops(images, WINDOW)
        psi, headers = {}, {}
        for phase, change in (("realsat", lambda image: image), ("darkened", darkened), ("stretched", stretched)):
            answers = [post(s.url, encode_png(change(image)), scale="2", steps="0") for image in traffic]
            assert all(a.status_code == 200 for a in answers), answers[0].text
            headers[phase] = answers[0].headers
            text = httpx.get(f"{s.url}/metrics").text
            psi[phase] = max(gauge(text, "hndsr_input_psi").values())
            assert re.search(rf'^hndsr_input_psi_window_requests{{client="",version="local"}} {WINDOW}\.0$', text, re.M)
        # Within the training data's own variation on realsat crops; far beyond it when darkened or stretched.
        assert psi["realsat"] < 0.25 < 0.4 < psi["stretched"] and psi["darkened"] > 1.0, psi
        for phase, answer in headers.items():
            assert float(answer["x-consistency-psnr-db"]) > 0 and float(answer["x-input-nodata"]) == 0, phase
            assert 0 <= float(answer["x-input-in-range"]) <= 1 and float(answer["x-input-psi"]) >= 0
        text = httpx.get(f"{s.url}/metrics").text
        assert re.search(r'^hndsr_consistency_psnr_db_count{version="local"} 90\.0$', text, re.M)
        assert re.search(r'^hndsr_input_in_range_ratio_count{client="",version="local"} 90\.0$', text, re.M)
        assert 'hndsr_consistency_reference_psnr_db{quantile="0.05",version="local"}' in text
    finally:
        s.stop()
    check_drift_alert(psi, tmp_path)


def check_drift_alert(psi: dict[str, float], tmp_path: Path) -> None:
    """promtool on the PSI values this server exported, 15 minutes a phase: HNDSRInputDrift stays quiet on the
    realsat phase and fires in the darkened and the stretched ones."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    values = " ".join(f"{psi[phase]}x14" for phase in ("realsat", "darkened", "stretched"))
    summary = "inputs to version local on a:8000 (client '') differ from its training data: PSI {:.2f}"
    labels = {"severity": "warning", "job": "hndsr", "instance": "a:8000", "version": "local"}
    test = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'hndsr_input_psi{job="hndsr", instance="a:8000", version="local", client="", band="red"}',
             "values": values},
            {"series": 'hndsr_input_psi_window_requests{job="hndsr", instance="a:8000", version="local", client=""}',
             "values": f"{WINDOW}x44"}],
        "alert_rule_test": [
            {"eval_time": "14m", "alertname": "HNDSRInputDrift", "exp_alerts": []},
            {"eval_time": "29m", "alertname": "HNDSRInputDrift", "exp_alerts": [
                {"exp_labels": labels, "exp_annotations": {"summary": summary.format(psi["darkened"])}}]},
            {"eval_time": "44m", "alertname": "HNDSRInputDrift", "exp_alerts": [
                {"exp_labels": labels, "exp_annotations": {"summary": summary.format(psi["stretched"])}}]},
        ]}]}
    path = tmp_path / "drift.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_drift_windows_slide_and_a_version_no_longer_served_loses_its_series():
    from types import SimpleNamespace

    from serving.drift import Drift
    from serving.metrics import Metrics

    rng = np.random.default_rng(0)
    training = rng.beta(2, 3, (200, 200, 3)).astype(np.float32)
    record = {"format_version": monitoring.FORMAT_VERSION, "consistency": None,
              "input": monitoring.input_reference(monitoring.band_counts(training), ["red", "green", "blue"], "t")}
    reference = monitoring.Reference.from_record(record)
    versions = [SimpleNamespace(info={"version": v}, reference=reference) for v in ("1", "2")]
    metrics = Metrics()
    drift = Drift(metrics, window_s=3600, max_requests=4)

    def figures(values: np.ndarray) -> monitoring.Assessment:
        return monitoring.Assessment(40.0, 0.01, reference.in_range(values, None), 0.0, monitoring.band_counts(values))

    like = [rng.beta(2, 3, (32, 32, 3)).astype(np.float32) for _ in range(4)]
    for values in like:
        quiet = drift.observe(versions[0], "acme", figures(values), {"1"})
    for values in like:  # four darker ones push the four like the training data out of the window
        loud = drift.observe(versions[0], "acme", figures(values * 0.5), {"1"})
    assert quiet < 0.1 < 1.0 < loud and drift.window("1", "acme") == 4
    drift.observe(versions[1], "acme", figures(like[0]), {"1", "2"})
    text = metrics.render()[0].decode()
    assert 'hndsr_input_psi{band="red",client="acme",version="1"}' in text
    drift.observe(versions[1], "other", figures(like[0]), {"2"})  # version 1 is no longer served
    text = metrics.render()[0].decode()
    assert 'version="1"' not in text and drift.window("1", "acme") == 0
    assert 'hndsr_input_psi{band="red",client="other",version="2"}' in text
