"""The HTTP server as a real process (`hndsr serve`) on a loopback port, with a small random-weight model
(serving behaviour does not depend on quality) and, for hot reload, a real `mlflow server`."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from hndsr.checkpoint import load_model, save_network, upstream_hashes
from hndsr.degradation import hr_size
from hndsr.images import encode_png
from hndsr.networks import (
    Autoencoder,
    AutoencoderConfig,
    DiffusionUNet,
    NeuralOperator,
    OperatorConfig,
    UNetConfig,
)
from hndsr.raster import DEFAULT_BANDS, DataSpec
from inference.acceleration import bfloat16_supported
from tests.compare import sha
from tests.conftest import free_port, stop_process

pytestmark = pytest.mark.slow
BF16, WHY_NOT_BF16 = bfloat16_supported(torch.device("cpu"))  # whether this CPU's start-up check can keep bfloat16
BIN = Path(sys.executable).parent


def write_model(folder: Path, seed: int, *, local: bool = False, bands: tuple[str, ...] = DEFAULT_BANDS,
                scales: dict[str, float] | None = None, unet_width: int = 8, steps: int = 2,
                perturb: float = 0.0) -> Path:
    """Random small networks as checkpoints. `local`: a lossless autoencoder (all 12 components of the 2x2
    blocks) and the operator at its untrained zero start, so like a trained model the output at a pixel depends
    on its neighbourhood only (a random operator sees grid coordinates; a lossy random autoencoder has a 2x2
    block phase), which the tiling test needs. `bands` and `scales`: the data spec (hndsr.raster) it records;
    `unet_width` and `steps` (its default DDIM steps): a slower model. `perturb`: the same model with noise of this
    standard deviation added to the decoder's linear map (a broken version of it)."""
    torch.manual_seed(seed)
    channels = len(bands)
    latent = 4 * channels if local else 4
    ae = Autoencoder(AutoencoderConfig(channels=channels, latent_channels=latent, width=8, blocks=1))
    ae.fit_linear(torch.rand(2, channels, 16, 16))
    if perturb:
        with torch.no_grad():
            weight = ae.dec_linear.weight
            weight += perturb * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed + 1))
    op = NeuralOperator(OperatorConfig(channels=channels, latent_channels=latent, width=8, modes=4, layers=2))
    torch.nn.init.normal_(op.project[-1].weight, std=0.0 if local else 0.01)
    unet = DiffusionUNet(UNetConfig(latent_channels=latent, width=unet_width, emb_dim=16))
    torch.nn.init.normal_(unet.out.weight, std=0.1)
    save_network(folder / "autoencoder", "autoencoder", ae,
                 extra={"data": DataSpec.fixed(tuple(bands), scales).to_config()})
    save_network(folder / "operator", "operator", op,
                 extra={"upstream": upstream_hashes("operator", folder), "scale_range": [2.0, 4.0]})
    save_network(folder / "diffusion", "diffusion", unet,
                 extra={"upstream": upstream_hashes("diffusion", folder), "scale_range": [2.0, 4.0],
                        "sampling": {"steps": steps, "eta": 0.0, "temperature": 0.5, "strength": 1.0},
                        "scheduler": {"num_train_timesteps": 1000, "prediction_type": "sample"}})
    return folder


class Server:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HNDSR_POLL_S": "0", **env}
        self.process = subprocess.Popen([str(BIN / "hndsr"), "serve", "--port", str(self.port)], env=full,
                                        stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited {self.process.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("served") / "models", seed=0)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server({"MODEL_URI": str(model_dir), "HNDSR_MAX_UPLOAD_BYTES": "300000", "HNDSR_MAX_INPUT_PIXELS": "40000",
                "HNDSR_MAX_OUTPUT_PIXELS": "400000", "HNDSR_MAX_QUEUE_PIXELS": "2000000", "HNDSR_PASS_MEGAPIXELS": "0.02",
                "HNDSR_TILE_OVERLAP": "4"}, tmp_path_factory.mktemp("logs"))
    s.wait_ready()
    yield s
    s.stop()


def png(height: int, width: int, seed: int = 0) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def post(url: str, data: bytes, scale="4", steps=None, seed=None, headers=None, **kwargs) -> httpx.Response:
    fields = {"scale": scale, **({"steps": steps} if steps is not None else {}), **({"seed": seed} if seed else {})}
    return httpx.post(f"{url}/v1/super-resolve", files={"file": ("in.png", data, "image/png")}, data=fields,
                      headers=headers, timeout=120, **kwargs)


def decode(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


@pytest.mark.parametrize(("scale", "height", "width"), [("4", 24, 30), ("2.5", 21, 17), ("3.3", 40, 70)])
def test_round_trip_follows_the_size_rule(server, scale, height, width):
    response = post(server.url, png(height, width), scale=scale, steps="1", seed="3")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    out = decode(response)
    s = float(scale)
    assert out.shape == (hr_size(height, s), hr_size(width, s), 3)
    assert response.headers["x-model-version"] == "local" and float(response.headers["x-inference-time-ms"]) > 0
    assert float(response.headers["x-queue-time-ms"]) >= 0
    assert response.headers["x-steps"] == "1"


def crop_png(folder: Path, height: int, width: int) -> tuple[bytes, np.ndarray]:
    """A real image (the first of the realsat folder), cropped at its centre."""
    pixels = np.asarray(Image.open(sorted(folder.glob("*.png"))[0]).convert("RGB"))
    y, x = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    crop = np.ascontiguousarray(pixels[y : y + height, x : x + width])
    return encode_png(crop), crop


def model_output(model_dir: Path, pixels: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """The model's own float32 output for a one-tile request (the engine's per-tile seed), given the input tensor
    laid out as the engine lays out a batch of one tile: oneDNN picks its convolution by the input's strides too,
    and with one thread a size-1 batch axis of stride 0 (`to_tensor` of one image) rounds a value differently."""
    from hndsr.images import to_uint8
    from inference.engine import Tile, _tile_seed

    tile_seed = _tile_seed(seed, Tile(0, 0, *pixels.shape[:2]))
    lr = torch.from_numpy(np.stack([DataSpec.fixed().image_to_model(pixels)])).permute(0, 3, 1, 2)  # (1, C, h, w)
    return to_uint8(load_model(model_dir).super_resolve(lr, scale, seed=[tile_seed]))[0]


def psnr_255(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize(("scale", "height", "width"), [("4", 32, 34), ("2.5", 44, 52)])
def test_served_output_equals_the_model_within_the_tolerance(server, model_dir, realsat, scale, height, width):
    image, pixels = crop_png(realsat, height, width)
    first, second = post(server.url, image, scale=scale, seed="7"), post(server.url, image, scale=scale, seed="7")
    assert first.status_code == 200, first.text
    assert sha(first.content) == sha(second.content)  # the seed decides
    inference = httpx.get(f"{server.url}/v1/model").json()["inference"]
    check = next(c for c in inference["checks"] if c["mode"] == "bfloat16")
    if BF16:  # a CPU with bfloat16 instructions: the small test model passes the start-up check with them
        assert inference["precision"] == "bfloat16", inference
        assert check["passed"] and check["psnr_db"] >= check["tolerance_db"] == 45
    else:  # without them: float32, and the check says why
        assert inference["precision"] == "float32" and check == {"mode": "bfloat16", "passed": False,
                                                                  "detail": WHY_NOT_BF16}, inference
    assert psnr_255(decode(first), model_output(model_dir, pixels, float(scale), 7)) >= 45
    assert post(server.url, image, scale=scale, seed="8").content != first.content
    default_steps = post(server.url, image, scale=scale)
    assert default_steps.headers["x-steps"] == "2"  # the model's recorded default


def test_cheaper_arithmetic_falls_back_to_float32_eager_when_its_check_fails(model_dir, realsat, tmp_path):
    """An unreachable tolerance fails both start-up checks (bfloat16, and a really compiled UNet): the server
    runs float32 eager and answers exactly the model's own output."""
    s = Server({"MODEL_URI": str(model_dir), "HNDSR_MIN_PSNR_DB": "300", "HNDSR_COMPILE": "on"}, tmp_path)
    try:
        s.wait_ready(timeout=300)  # compiling on two cores takes a while
        info = httpx.get(f"{s.url}/v1/model").json()
        inference = info["inference"]
        assert (inference["precision"], inference["compiled"], inference["layout"]) == ("float32", False,
                                                                                          "contiguous"), inference
        checks = {c["mode"]: c for c in inference["checks"]}
        assert not checks["compile"]["passed"] and checks["compile"]["tolerance_db"] == 300, checks["compile"]
        log = s.log.read_text()
        # (on a CPU where the compiled graph gives NaN, seen with ATEN_CPU_CAPABILITY=avx2, it says that instead)
        assert ("compile: off (outside the tolerance)" in log
                or "compile: off (its output on the reference input holds NaN or infinity" in log)
        assert not checks["bfloat16"]["passed"]
        if BF16:
            assert checks["bfloat16"]["psnr_db"] < 300 and "bfloat16: off (outside the tolerance)" in log
        else:
            assert checks["bfloat16"]["detail"] == WHY_NOT_BF16 and f"bfloat16: off ({WHY_NOT_BF16})" in log
        image, pixels = crop_png(realsat, 30, 26)
        for scale in ("4", "2.5"):
            response = post(s.url, image, scale=scale, seed="3")
            np.testing.assert_array_equal(decode(response), model_output(model_dir, pixels, float(scale), 3))
        assert 'precision="float32"' in httpx.get(f"{s.url}/metrics").text
    finally:
        s.stop()


def test_model_health_metrics_and_docs(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["version"] == "local" and info["default_steps"] == 2 and info["scale_range"] == [2.0, 4.0]
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("hndsr_requests_total", "hndsr_request_seconds_bucket", "hndsr_queue_tiles", "hndsr_images_total",
                 "hndsr_output_pixels_total", "hndsr_queue_seconds_count", "hndsr_inference_seconds_count",
                 "process_resident_memory_bytes", "process_cpu_seconds_total", "python_gc_objects_collected_total",
                 f'hndsr_model_info{{alias="",compiled="false",precision="{"bfloat16" if BF16 else "float32"}",source='):
        assert name in metrics
    assert info["engine"]["pass_megapixels"] == 0.02 and info["engine"]["max_batch"] == 1  # CPU default
    for page in ("/docs", "/redoc"):  # their scripts come from the server itself: they work air-gapped
        html = httpx.get(f"{server.url}{page}").text
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
        assert any(a.endswith(".js") for a in assets)
        for asset in assets:
            assert httpx.get(f"{server.url}{asset}").status_code == 200, asset
    assert "/v1/super-resolve" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def _truncated_png() -> bytes:
    data = png(60, 60)
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP) with almost no data."""
    import struct

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
        chunk(b"IEND", b"")


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "make", "status", "code"), [
    ("empty file", lambda u: post(u, b""), 400, "empty_file"),
    ("not an image", lambda u: post(u, b"hello, not an image"), 415, "unsupported_image"),
    ("truncated", lambda u: post(u, _truncated_png()), 400, "bad_image"),
    ("unsupported format", lambda u: post(u, _gif()), 415, "unsupported_image"),
    ("decompression bomb", lambda u: post(u, _bomb_png()), 413, "input_too_large"),
    ("input above pixel limit", lambda u: post(u, png(250, 250)), 413, "input_too_large"),
    ("output above pixel limit", lambda u: post(u, png(180, 180), scale="4"), 413, "output_too_large"),
    ("upload above byte limit", lambda u: post(u, b"\0" * 400_000), 413, "upload_too_large"),
    ("scale out of range", lambda u: post(u, png(8, 8), scale="9"), 422, "scale_out_of_range"),
    ("scale not a number", lambda u: post(u, png(8, 8), scale="four"), 422, "invalid_scale"),
    ("scale not finite", lambda u: post(u, png(8, 8), scale="nan"), 422, "invalid_scale"),
    ("steps out of range", lambda u: post(u, png(8, 8), steps="1000"), 422, "steps_out_of_range"),
    ("negative steps", lambda u: post(u, png(8, 8), steps="-1"), 422, "steps_out_of_range"),
    ("steps not a number", lambda u: post(u, png(8, 8), steps="2.5"), 422, "invalid_steps"),
    ("missing file", lambda u: httpx.post(f"{u}/v1/super-resolve", data={"scale": "4"},
                                          files={"other": ("x", b"1")}), 422, "missing_file"),
    ("missing scale", lambda u: httpx.post(f"{u}/v1/super-resolve", files={"file": ("a.png", png(8, 8))}),
     422, "missing_scale"),
    ("wrong content type", lambda u: httpx.post(f"{u}/v1/super-resolve", content=png(8, 8),
                                                headers={"content-type": "image/png"}), 415, "not_multipart"),
    ("malformed multipart", lambda u: httpx.post(f"{u}/v1/super-resolve", content=b"\0" * 1000,
                                                 headers={"content-type": "multipart/form-data; boundary=x"}), 400,
     "bad_multipart"),
    ("empty body", lambda u: httpx.post(f"{u}/v1/super-resolve", content=b"",
                                        headers={"content-type": "multipart/form-data; boundary=x"}), 400,
     "empty_body"),
    ("no boundary", lambda u: httpx.post(f"{u}/v1/super-resolve", content=_multipart(png(8, 8)),
                                         headers={"content-type": "multipart/form-data"}), 400, "bad_multipart"),
    ("bands on a PNG", lambda u: httpx.post(f"{u}/v1/super-resolve", files={"file": ("a.png", png(8, 8))},
                                            data={"scale": "2", "bands": "1,2,3"}), 422, "wrong_bands"),
])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, name, make, status, code):
    response = make(server.url)
    assert response.status_code == status, (name, response.text)
    body = response.json()
    assert body["error"] == code and body["detail"], body
    assert post(server.url, png(8, 8), steps="0").status_code == 200


def _multipart(image: bytes, boundary: bytes = b"b") -> bytes:
    return (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="scale"\r\n\r\n2\r\n--' + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            + image + b"\r\n--" + boundary + b"--\r\n")


def test_a_body_longer_than_its_content_length_is_one_clear_400_and_the_connection_closes(server):
    """The server reads Content-Length bytes: the closing boundary is missing from them (400 bad_multipart, not
    `missing_file`), and the rest of the body is never parsed as another request (no stray plain-text 400)."""
    import socket

    body = _multipart(png(8, 8))
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/super-resolve HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\nContent-Length: %d\r\n\r\n" % (len(body) - 40) + body)
        answer = b""
        while data := sock.recv(65536):  # until the server closes the connection
            answer += data
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1") == 1, answer[:600]
    assert b'"error":"bad_multipart"' in answer and b"without the multipart's closing boundary" in answer


def test_upload_limit_is_enforced_while_streaming(server):
    """A chunked body (no Content-Length) that passes the limit is refused before it ends: we send a file part
    of 400 kB that never finishes, and the 413 must still come back."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/super-resolve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        chunk = b"\0" * 100_000
        for _ in range(4):
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = ""  # no final chunk was sent: the answer must come anyway
        while "upload_too_large" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:300]
    assert "upload_too_large" in answer


def test_concurrent_requests_equal_sequential_ones(server):
    images = [png(24 + i % 3 * 8, 30, seed=i) for i in range(32)]
    sequential = {i: post(server.url, images[i], scale="3", steps="1", seed=str(i)).content for i in range(4)}
    results: dict[int, httpx.Response] = {}

    def go(i):
        results[i] = post(server.url, images[i], scale="3", steps="1", seed=str(i))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status_code for r in results.values()} <= {200, 503}
    assert sum(r.status_code == 200 for r in results.values()) >= 4
    for i, content in sequential.items():
        if results[i].status_code == 200:
            assert sha(results[i].content) == sha(content)
    for r in results.values():
        if r.status_code == 503:
            assert r.headers["retry-after"]


def test_queue_full_is_503_with_retry_after(model_dir, tmp_path):
    s = Server({"MODEL_URI": str(model_dir), "HNDSR_MAX_OUTPUT_PIXELS": "100000", "HNDSR_MAX_QUEUE_PIXELS": "100000",
                "HNDSR_PASS_MEGAPIXELS": "0.02", "HNDSR_TILE_OVERLAP": "4"}, tmp_path)
    try:
        s.wait_ready()
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(s.url, png(70, 70), scale="4", steps="3")))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"] == "overloaded"
        assert 'hndsr_rejections_total{reason="overloaded"}' in httpx.get(f"{s.url}/metrics").text
    finally:
        s.stop()


def test_what_cannot_finish_is_refused_at_once_and_what_runs_late_is_504(model_dir, tmp_path):
    s = Server({"MODEL_URI": str(model_dir), "HNDSR_DEADLINE_S": "1", "HNDSR_PASS_MEGAPIXELS": "0.02",
                "HNDSR_TILE_OVERLAP": "4", "HNDSR_MAX_INPUT_PIXELS": "10000000",
                "HNDSR_MAX_OUTPUT_PIXELS": "100000000", "HNDSR_MAX_QUEUE_PIXELS": "200000000"}, tmp_path)
    try:
        s.wait_ready()
        speed = httpx.get(f"{s.url}/v1/model").json()["speed"]
        assert speed["s_per_output_megapixel"] > 0 and speed["s_per_output_megapixel_step"] > 0, speed
        # 2000 x 2000 at x4 with 40 steps: far past a 1 s deadline on any machine: refused from the header, at once.
        start = time.monotonic()
        big = post(s.url, png(2000, 2000), scale="4", steps="40")
        assert big.status_code == 413 and big.json()["error"] == "would_not_finish", big.text
        assert time.monotonic() - start < 5
        detail = big.json()["detail"]
        edge = int(re.search(r"send at most about (\d+)x\1 px", detail).group(1))
        assert "past its deadline of 1 s (HNDSR_DEADLINE_S)" in detail and 8 <= edge < 2000, detail
        # What the estimate admits, alone, but waits behind others past the deadline: 504, the server keeps serving.
        edge = max(8, min(edge // 2, 200))
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: post(s.url, png(edge, edge, seed=i), scale="4", steps="40"), range(12)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 504} and 504 in codes, codes
        late = next(a for a in answers if a.status_code == 504)
        assert late.json()["error"] == "deadline_exceeded"
        assert post(s.url, png(8, 8), steps="0").status_code == 200  # still serving
    finally:
        s.stop()


def test_api_key(model_dir, tmp_path):
    s = Server({"MODEL_URI": str(model_dir), "HNDSR_API_KEY": "s3cret"}, tmp_path)
    try:
        s.wait_ready()
        assert post(s.url, png(8, 8), steps="0").status_code == 401
        assert post(s.url, png(8, 8), steps="0", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(s.url, png(8, 8), steps="0", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{s.url}/v1/model").status_code == 401
        assert httpx.get(f"{s.url}/healthz").status_code == 200 and httpx.get(f"{s.url}/readyz").status_code == 200
    finally:
        s.stop()


def test_request_in_flight_completes_on_sigterm(model_dir, tmp_path):
    s = Server({"MODEL_URI": str(model_dir), "HNDSR_PASS_MEGAPIXELS": "0.02", "HNDSR_TILE_OVERLAP": "4"}, tmp_path)
    s.wait_ready()
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(s.url, png(100, 100), scale="4", steps="20")))
    thread.start()
    time.sleep(1.0)
    s.process.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert result["r"].status_code == 200 and decode(result["r"]).shape == (400, 400, 3)
    assert s.process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    assert "draining" in s.log.read_text()


def test_unloadable_model_exits_non_zero_with_the_reason(tmp_path):
    s = Server({"MODEL_URI": str(tmp_path / "nowhere")}, tmp_path)
    assert s.process.wait(timeout=60) == 4  # start-up failure; 3 is the registry's "rejected"
    log = s.log.read_text()
    assert "hndsr serve: error: cannot start: MODEL_URI=" in log and "neither a models:/ URI nor an existing" in log
    assert "Traceback" not in log


def test_a_port_in_use_stops_start_up_at_once_with_one_line(model_dir, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([str(BIN / "hndsr"), "serve", "--port", str(port)], capture_output=True, text=True,
                                env={**os.environ, "MODEL_URI": str(model_dir)}, timeout=120)
    assert result.returncode == 4, result.stderr[-2000:]
    assert f"hndsr serve: error: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use" \
        in result.stderr.strip().splitlines()[-1]
    assert "loaded model" not in result.stderr and "Traceback" not in result.stderr  # said before loading


def test_a_corrupt_checkpoint_stops_start_up_with_one_line(model_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(model_dir, broken)
    weights = broken / "autoencoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b'{"garbage": '  # the JSON header, after its 8-byte length
    weights.write_bytes(bytes(data))
    s = Server({"MODEL_URI": str(broken)}, tmp_path)
    assert s.process.wait(timeout=60) == 4
    log = s.log.read_text()
    assert f"{weights} is not a readable safetensors file" in log and "re-run `dvc repro`" in log
    assert "Traceback" not in log and len([line for line in log.splitlines() if "error" in line.lower()]) == 1


def test_a_pass_budget_too_small_for_the_model_stops_start_up(model_dir, tmp_path):
    s = Server({"MODEL_URI": str(model_dir), "HNDSR_PASS_MEGAPIXELS": "0.001"}, tmp_path)
    assert s.process.wait(timeout=120) != 0
    assert "HNDSR_PASS_MEGAPIXELS=0.001 is too small for this model: the smallest tile at its largest scale (x4)" \
        in s.log.read_text()


def tamper(store: Path, digest: str) -> Path:
    """Flip one byte in the middle of the weight file with SHA-256 `digest` under artifact store `store`."""
    path = next(p for p in store.rglob("model.safetensors") if sha(p.read_bytes()) == digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def test_hot_reload_follows_the_alias(tmp_path, realsat):
    from mlflow import MlflowClient

    from registry.promote import PYFUNC_FILE
    from registry.store import Registry
    from tests.tracking import start_mlflow_server

    mlflow_server = start_mlflow_server(f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "art"), tmp_path)
    try:
        env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
        os.environ.update(env)
        registry = Registry("served", mlflow_server.uri)
        versions = [registry.register(write_model(tmp_path / f"m{i}" / "checkpoints", seed=i), python_model=PYFUNC_FILE,
                                      experiment="serving-test", tags={}, run_tags={}, signature=None,
                                      input_example=None, pip_requirements=["torch"])
                    for i in range(2)]
        client = MlflowClient(mlflow_server.uri)
        client.set_registered_model_alias("served", "production", versions[0].version)
        s = Server({**env, "MODEL_URI": "models:/served@production", "HNDSR_POLL_S": "0.5"}, tmp_path)
        try:
            s.wait_ready()
            image = encode_png(np.asarray(Image.open(realsat / "landsat8_grenada.png").convert("RGB"))[:24, :24])
            before = post(s.url, image, scale="2", steps="1")
            assert before.headers["x-model-version"] == "1" and before.headers["x-model-alias"] == "production"
            client.set_registered_model_alias("served", "production", versions[1].version)
            deadline = time.monotonic() + 60
            while httpx.get(f"{s.url}/v1/model").json()["version"] != "2":
                assert time.monotonic() < deadline, s.log.read_text()[-2000:]
                time.sleep(0.3)
            after = post(s.url, image, scale="2", steps="1")
            assert after.headers["x-model-version"] == "2" and after.content != before.content
            # A version that cannot be loaded: logged, and version 2 keeps serving.
            broken = write_model(tmp_path / "m2" / "checkpoints", seed=2)
            (broken / "diffusion" / "model.safetensors").write_bytes(b"not safetensors")
            bad = registry.register(broken, python_model=PYFUNC_FILE, experiment="serving-test", tags={},
                                    run_tags={}, signature=None, input_example=None, pip_requirements=["torch"])
            client.set_registered_model_alias("served", "production", bad.version)
            time.sleep(3)  # six polls: tried once, then left alone for the back-off (5 s), not downloaded each poll
            assert httpx.get(f"{s.url}/v1/model").json()["version"] == "2"
            assert post(s.url, image, scale="2", steps="1").status_code == 200
            log = s.log.read_text()
            assert log.count(f"loading version {bad.version} as the production failed") == 1, log[-3000:]
            assert "dvc" not in log and "Traceback" not in log
            reloads = httpx.get(f"{s.url}/metrics").text
            assert 'hndsr_model_reloads_total{outcome="loaded"} 1.0' in reloads
            assert 'hndsr_model_reloads_total{outcome="failed"} 1.0' in reloads

            # One byte of version 1's diffusion weights flipped in the artifact store, then a rollback to it:
            # refused (its hashes are not the registered ones), version 2 keeps serving, said in the log and metrics.
            stored = tamper(tmp_path / "art", registry.get(versions[0].version).tags["weights.diffusion"])
            client.set_registered_model_alias("served", "production", versions[0].version)
            deadline = time.monotonic() + 30
            while "refused version 1" not in s.log.read_text():
                assert time.monotonic() < deadline, s.log.read_text()[-3000:]
                time.sleep(0.3)
            time.sleep(1.5)  # polls later: not downloaded again
            assert httpx.get(f"{s.url}/v1/model").json()["version"] == "2"
            assert httpx.get(f"{s.url}/readyz").json() == {"status": "ready", "version": "2"}
            again = post(s.url, image, scale="2", steps="1")
            assert again.headers["x-model-version"] == "2" and sha(again.content) == sha(after.content)
            log = s.log.read_text()
            line = next(x for x in log.splitlines() if "refused version 1" in x)
            assert "diffusion weights in the artifact store are not the ones it was registered with" in line, line
            assert log.count("refused version 1") == 1
            metrics = httpx.get(f"{s.url}/metrics").text
            assert 'hndsr_model_integrity_failures_total{version="1"} 1.0' in metrics
            assert 'hndsr_model_reloads_total{outcome="refused"} 1.0' in metrics
        finally:
            s.stop()
        # At start-up: the altered version stops the server with one line (exit 4), nothing served.
        s = Server({**env, "MODEL_URI": "models:/served/1"}, tmp_path)
        assert s.process.wait(timeout=120) == 4
        lines = s.log.read_text().strip().splitlines()
        assert "weights in the artifact store are not the ones it was registered with" in lines[-1], lines[-5:]
        assert stored.is_file()
    finally:
        for key in ("MLFLOW_TRACKING_URI",):
            os.environ.pop(key, None)
        mlflow_server.stop()


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    result = subprocess.run(
        [str(BIN / "schemathesis"), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "30", "--workers", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache goes to the cwd
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert schemathesis is not None
