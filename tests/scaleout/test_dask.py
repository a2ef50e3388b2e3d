"""Distributed ETL and batch prediction on Dask: a local cluster of two worker processes, and a cluster started
with Dask's own `dask scheduler` / `dask worker` commands, give the same bytes as one process (prediction: as one
process with the workers' thread count; with another count, within one level); a task whose worker is killed is
retried (or, with no failure allowed, reported) while the others' results are kept."""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hndsr import cores
from tests.compare import assert_close_rasters, assert_same_files
from tests.conftest import REPO, free_port, stop_process
from tests.scaleout.conftest import BIN, env, hndsr
from tests.serving.test_server import write_model

pytestmark = pytest.mark.scaleout

OUTPUTS = ("train.parquet", "val.parquet", "test.parquet", "manifest.json")


def _params(folder: Path, source: Path, **etl) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["etl"].update(source=str(source), **etl)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _same(a: Path, b: Path, names=OUTPUTS) -> None:
    assert_same_files(a, b, names)


def _etl(folder: Path, out: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    result = hndsr(folder, "etl", "--params", "params.yaml", "--out", out, *args, **extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_etl_on_two_local_workers_writes_the_same_bytes(tmp_path, realsat, geotiff):
    # 8-bit PNGs with a duplicate across sources (dropped by the merge whichever worker tiled it)
    images = tmp_path / "images"
    shutil.copytree(realsat, images, ignore=shutil.ignore_patterns("*.md"))
    shutil.copy(images / "landsat8_grenada.png", images / "zz_copy_of_grenada.png")
    _params(tmp_path, images)
    one = _etl(tmp_path, "one")
    two = _etl(tmp_path, "two", "--workers", "2")
    _same(tmp_path / "one", tmp_path / "two")
    assert "2 workers" in two.stderr and "duplicate" in one.stdout
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["inputs"]["tiles_dropped"]["duplicate"] > 0

    # GeoTIFFs with percentile radiometry: the sampling pass runs as tasks too
    rasters = tmp_path / "rasters"
    rasters.mkdir()
    _params(rasters, geotiff, bands=[1, 2, 3], max_nodata_share=0.25,
            radiometry={"method": "percentile", "percentiles": [1.0, 99.0]})
    _etl(rasters, "one")
    _etl(rasters, "two", "--workers", "2")
    _same(rasters / "one", rasters / "two")


class DaskCluster:
    """`dask scheduler` and `dask worker --nworkers 2` processes, as an operator would start them."""

    def __init__(self, folder: Path, **scheduler_env: str) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.log = folder / f"dask-{port}.log"
        out = self.log.open("w")
        self.scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                           "--no-dashboard"], env=env(**scheduler_env), stdout=out,
                                          stderr=subprocess.STDOUT)
        self.workers = subprocess.Popen([str(BIN / "dask"), "worker", self.address, "--nworkers", "2", "--nthreads",
                                         "1", "--no-dashboard"], env=env(), stdout=out, stderr=subprocess.STDOUT)
        from dask.distributed import Client

        self.client = Client(self.address, timeout="60s")
        self.client.wait_for_workers(2, timeout=120)

    def kill_worker_running(self, key_part: str, stop: threading.Event) -> list[str]:
        """SIGKILL the worker process running the task whose key ends with `key_part`, once every other task is
        done and collected (a dead worker also loses the results it holds, which Dask would have to recompute)."""
        while not stop.is_set():
            states = self.client.run_on_scheduler(
                lambda dask_scheduler: {str(k): (t.state, t.processing_on.address if t.processing_on else None)
                                        for k, t in dask_scheduler.tasks.items()})
            mine = {k: v for k, v in states.items() if k.startswith("etl images-")}
            target = [v[1] for k, v in mine.items() if k.endswith(key_part) and v[0] == "processing"]
            if target and len(mine) == 1:
                pid = self.client.run(os.getpid, workers=[target[0]])[target[0]]
                os.kill(pid, signal.SIGKILL)
                return target
            time.sleep(0.02)
        return []

    def close(self) -> None:
        self.client.close()
        stop_process(self.workers)
        stop_process(self.scheduler)


def _killing(cluster: DaskCluster, key_part: str, run):
    stop, killed = threading.Event(), []
    thread = threading.Thread(target=lambda: killed.extend(cluster.kill_worker_running(key_part, stop)))
    thread.start()
    try:
        result = run()
    finally:
        stop.set()
        thread.join()
    return result, killed


def test_etl_on_a_dask_cluster_survives_a_killed_worker(tmp_path, realsat):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("landsat8_grenada.png", "spacenet6_rotterdam_urban.png", "landsat7_bahamas_crop.png"):
        shutil.copy(realsat / name, images / name)
    big = np.asarray(Image.open(realsat / "naip_northdakota_2020.png").convert("RGB"))
    Image.fromarray(np.tile(big, (3, 3, 1))).save(images / "mosaic_big.png")  # a task that runs for seconds
    _params(tmp_path, images, splits={"train": 0.5, "val": 0.25, "test": 0.25})
    _etl(tmp_path, "one")
    index = sorted(p.name for p in images.iterdir()).index("mosaic_big.png")  # task keys: "<desc>-<run>-<index>"

    retrying = DaskCluster(tmp_path)  # Dask's default: a task whose worker dies is moved to another
    try:
        result, killed = _killing(retrying, f"-{index}", lambda: _etl(tmp_path, "retried", "--cluster",
                                                                      retrying.address))
    finally:
        retrying.close()
    assert killed, "the big image's task was never seen running"
    _same(tmp_path / "one", tmp_path / "retried")

    # no second chance, and one task at a time per worker thread (Dask queues the rest on the scheduler), so the
    # kill fails the big image's task alone
    strict = DaskCluster(tmp_path, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0",
                         DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="1.0")
    try:
        result, killed = _killing(strict, f"-{index}", lambda: _etl(tmp_path, "reported", "--cluster",
                                                                    strict.address))
    finally:
        strict.close()
    assert killed
    manifest = json.loads((tmp_path / "reported" / "manifest.json").read_text())
    assert [s["source"] for s in manifest["skipped"]] == ["mosaic_big.png"]
    assert "KilledWorker" in manifest["skipped"][0]["reason"]
    assert manifest["inputs"]["images_read"] == 3  # the other sources' tiles are all there
    expected = json.loads((tmp_path / "one" / "manifest.json").read_text())
    kept = {s["id"]: s["tiles_kept"] for s in expected["sources"]}
    assert {s["id"]: s["tiles_kept"] for s in manifest["sources"]} == {k: v for k, v in kept.items()
                                                                      if k != "mosaic_big.png"}
    assert "1 skipped" in result.stdout


def test_batch_prediction_on_two_local_workers_writes_the_same_bytes(tmp_path, realsat, geotiff):
    model = write_model(tmp_path / "models", seed=0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, name in enumerate(sorted(p.name for p in realsat.glob("*.png"))[:4]):
        Image.open(realsat / name).convert("RGB").crop((0, 0, 48 + 8 * i, 40)).save(inputs / name)
    shutil.copy(geotiff / "landsat7_rgb_byte_nodata.tif", inputs / "scene.tif")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    runs = {}
    # "one": one process with the thread count each of two workers gets; "default": torch's own count (the cores)
    for name, args, threads in (("one", [], cores.share_env(2)), ("two", ["--workers", "2"], {}),
                                ("default", [], {})):
        runs[name] = hndsr(tmp_path, "predict", str(inputs), "--out", name, "--scale", "2.5", "--model", str(model),
                           "--window", "256", *args, MODEL_URI=str(model), **threads)
        assert runs[name].returncode == 1, runs[name].stderr[-3000:]  # one input failed, reported
        assert "5 written" in runs[name].stdout and "1 failed" in runs[name].stdout
        assert "broken.png" in runs[name].stdout
    written = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(written) == 10 and {Path("scene.tif"), Path("scene.consistency.json")} <= set(written)
    images = [p for p in written if p.suffix != ".json"]
    assert all(p.with_name(f"{p.stem}.consistency.json") in written for p in images)  # each with its report
    _same(tmp_path / "one", tmp_path / "two", images)  # the same thread count: the same bytes
    for image in images:  # another thread count rounds some float sums differently: at most one level, rarely
        assert_close_rasters(tmp_path / "default" / image, tmp_path / "one" / image, max_levels=1, max_share=1e-3)
    # the scene's report: the same figures, apart from where it was written and how long it took
    reports = [json.loads((tmp_path / run / "scene.consistency.json").read_text()) for run in ("one", "two")]
    assert reports[1]["threads"] == cores.share(2)  # each local worker its share of the cores
    for report in reports:
        for key in ("output", "seconds", "output_megapixels_per_s"):
            report.pop(key)
    assert reports[0] == reports[1]
