"""The serving image built and run (marker `container`): serving/Dockerfile built by the project's own script on a
base made from Debian's packages, started against a real tracking server that holds a promoted model, and checked
as users run it: healthy by its own HEALTHCHECK, non-root, the same answers as `hndsr serve` outside it,
GeoTIFFs still on the map, and `docker stop` draining."""

from __future__ import annotations

import io
import threading
import time
import uuid

import httpx
import pytest
from PIL import Image

from tests.containers import Container, bridge_gateway, docker, require_engine
from tests.inference.test_predict import check_georeferenced_output
from tests.serving.test_server import Server, decode, psnr_255
from tests.tracking import copy_candidate, run, start_mlflow_server

# The first test's fixtures build the image (3 min 19 s with a cold Docker cache here), may train the session's
# candidates (about 2.5 min) and wait for the container's health check: more than the default 300 s.
pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(900)]
STOP_TIMEOUT_S = 45  # docker run --stop-timeout, as the README and the compose file's stop_grace_period say


@pytest.fixture(scope="module")
def published(tmp_path_factory, candidates):
    """A tracking server reachable from containers (this host's bridge address) holding a promoted model."""
    require_engine()
    root = tmp_path_factory.mktemp("published")
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), root,
                                 host=bridge_gateway())
    name = f"hndsr-image-{uuid.uuid4().hex[:8]}"
    project = copy_candidate(candidates["good"], root / "project", name)
    promoted = run(["hndsr", "registry", "promote", "--params", "params.yaml"], project,
                   env={"MLFLOW_TRACKING_URI": server.uri})
    assert promoted.returncode == 0, promoted.stdout[-2000:] + promoted.stderr[-3000:]
    yield {"uri": server.uri, "model_uri": f"models:/{name}@production"}
    server.stop()


@pytest.fixture(scope="module")
def container(serve_image, published):
    box = Container(serve_image, ports=(8000,), options=("--stop-timeout", str(STOP_TIMEOUT_S)),
                    env={"MLFLOW_TRACKING_URI": published["uri"], "MODEL_URI": published["model_uri"],
                         "HNDSR_DRAIN_S": "30"})
    try:
        box.healthy_after = box.wait_healthy(timeout=240)
        yield box
    finally:
        print(box.logs()[-3000:])
        box.remove()


def queued_pixels(url: str) -> float:
    """The server's own gauge of output pixels admitted and not done (serving/metrics.py)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("hndsr_queue_output_pixels ")))


def real_crop(realsat, size: int) -> bytes:
    with Image.open(realsat / "landsat8_grenada.png") as img:
        crop = img.convert("RGB").crop((0, 0, size, size))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    return buffer.getvalue()


def super_resolve(url: str, data: bytes, name: str = "in.png", **fields) -> httpx.Response:
    headers = fields.pop("headers", None)
    return httpx.post(f"{url}/v1/super-resolve", files={"file": (name, data)},
                      data={"scale": "4", "seed": "7", **fields}, headers=headers, timeout=300)


def test_turns_healthy_by_its_own_healthcheck_and_runs_as_the_non_root_user(container):
    assert container.inspect()["State"]["Health"]["Status"] == "healthy"
    url = container.url(8000)
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    model = httpx.get(f"{url}/v1/model", timeout=10).json()
    assert model["device"] == "cpu"
    # The server process itself (PID 1, the ENTRYPOINT), not only `docker exec`'s default user.
    status = dict(line.split(":", 1) for line in container.exec("cat", "/proc/1/status").splitlines() if ":" in line)
    assert status["Uid"].split()[:2] == ["10001", "10001"], status["Uid"]
    assert container.exec("id", "-un").strip() == "hndsr"
    assert "hndsr serve" in " ".join(container.exec("cat", "/proc/1/cmdline").split("\0"))


def test_answers_what_hndsr_serve_outside_the_container_answers(container, published, realsat, tmp_path):
    outside = Server({"MODEL_URI": published["model_uri"], "MLFLOW_TRACKING_URI": published["uri"]}, tmp_path)
    try:
        outside.wait_ready(timeout=120)
        data = real_crop(realsat, 128)
        inside_answer = super_resolve(container.url(8000), data)
        outside_answer = super_resolve(outside.url, data)
    finally:
        outside.stop()
    assert inside_answer.status_code == 200, inside_answer.text
    assert outside_answer.status_code == 200, outside_answer.text
    inside, there = decode(inside_answer), decode(outside_answer)
    assert inside.shape == there.shape == (512, 512, 3)
    assert inside_answer.headers["x-model-version"] == outside_answer.headers["x-model-version"]
    assert psnr_255(inside, there) >= 45.0


def test_a_geotiff_answer_keeps_its_georeference(container, geotiff, tmp_path):
    source = geotiff / "landsat7_rgb_byte_nodata.tif"
    answer = super_resolve(container.url(8000), source.read_bytes(), name=source.name, scale="2.5", steps="0",
                           format="tiff")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/tiff"
    (tmp_path / "out.tif").write_bytes(answer.content)
    check_georeferenced_output(source, tmp_path / "out.tif", 2.5)


def test_serves_a_clones_own_mlflow_db_mounted_at_its_path(serve_image, candidates, realsat, tmp_path):
    """README "The container": `docker run -v "$PWD:$PWD" -e MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db` in a
    clone whose pipeline promoted into its own mlflow.db (artifacts at absolute paths in mlartifacts/)."""
    clone = copy_candidate(candidates["good"], tmp_path / "clone", "hndsr")
    promoted = run(["hndsr", "registry", "promote", "--params", "params.yaml"], clone, env={})
    assert promoted.returncode == 0, promoted.stdout[-2000:] + promoted.stderr[-3000:]
    for path in [clone, *clone.rglob("*")]:  # readable by the image's user (uid 10001), as the README says
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    box = Container(serve_image, ports=(8000,), options=("-v", f"{clone}:{clone}"),
                    env={"MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"})
    try:
        box.wait_healthy(timeout=240)
        assert box.exec("id", "-u").strip() == "10001"
        answer = super_resolve(box.url(8000), real_crop(realsat, 64), scale="4")
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-model-version"] == "1"
        assert decode(answer).shape[:2] == (256, 256)
    finally:
        print(box.logs()[-3000:])
        box.remove()


def test_docker_stop_drains(container, realsat):
    """Last in the module: it stops the container. The request in flight completes, new ones get 503 with
    Retry-After, and the container exits well inside its stop timeout."""
    url = container.url(8000)
    slow = real_crop(realsat, 256)
    result: dict = {}
    in_flight = threading.Thread(target=lambda: result.update(r=super_resolve(url, slow, steps="40")))
    in_flight.start()
    deadline = time.monotonic() + 30
    while queued_pixels(url) == 0:
        assert time.monotonic() < deadline, "the slow request never showed as in flight"
        time.sleep(0.1)
    stopped: dict = {}

    def stop() -> None:
        start = time.monotonic()
        docker("stop", container.name, timeout=STOP_TIMEOUT_S + 30)
        stopped["seconds"] = time.monotonic() - start

    stopper = threading.Thread(target=stop)
    stopper.start()
    refused = None
    deadline = time.monotonic() + 20
    while refused is None and time.monotonic() < deadline:
        try:
            answer = super_resolve(url, real_crop(realsat, 32), steps="0")
        except httpx.HTTPError:
            break
        if answer.status_code == 503:
            refused = answer
        time.sleep(0.2)
    in_flight.join(timeout=STOP_TIMEOUT_S + 30)
    stopper.join(timeout=STOP_TIMEOUT_S + 30)
    assert refused is not None and "retry-after" in refused.headers, "no 503 while draining"
    assert result["r"].status_code == 200, result["r"].text
    assert decode(result["r"]).shape == (1024, 1024, 3)
    assert stopped["seconds"] < STOP_TIMEOUT_S, stopped
    state = container.inspect()["State"]
    assert not state["Running"] and state["ExitCode"] in (0, 143), state  # 143: uvicorn re-raises SIGTERM
    assert "draining" in container.logs()
