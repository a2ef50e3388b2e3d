"""What the label-free monitoring (hndsr/monitoring.py) costs a request: two `hndsr serve` of the same model, one
with HNDSR_MONITORING=true (the default) and one with false, asked in turn, one request at a time.

    python benchmarks/monitoring_overhead.py [--model-uri models] [--sizes 64 128 256] [--scale 4] [--requests 20]

For each input size (square crops of imagery/realsat, PNG) it prints the median request time of each server,
the difference as a share of the request (the budget: <= 3 % at 128 px), and what `monitoring.assess` alone
takes in this process on the same image and output (its cost when nothing hides it: the server runs it beside
the answer's encoding). Both servers answer every request in turn (A B A B ...), so drift of the machine falls on
both. Give it the machine alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from hndsr import monitoring  # noqa: E402
from hndsr.images import decode_rgb, encode_png  # noqa: E402


def start(model_uri: str, monitoring_on: bool, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MODEL_URI": model_uri, "HNDSR_POLL_S": "0", "HNDSR_MONITORING": str(monitoring_on).lower()}
    process = subprocess.Popen([str(BIN / "hndsr"), "serve", "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait(process: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            sys.exit(f"a server did not start:\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models", help="MODEL_URI of both servers (default: %(default)s)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256], metavar="PX")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=20, help="per size and server (default: %(default)s)")
    parser.add_argument("--images", type=Path, default=REPO / "imagery" / "realsat")
    args = parser.parse_args()
    source = decode_rgb(sorted(args.images.glob("*.png"))[0].read_bytes(), max_pixels=10**8)
    print(f"{cpu()}, {os.cpu_count()} cores, torch {torch.__version__}; model {args.model_uri}; x{args.scale:g}, "
          f"{args.requests} requests per size and server, one at a time, servers in turn")
    with tempfile.TemporaryFile() as log_on, tempfile.TemporaryFile() as log_off:
        on, url_on = start(args.model_uri, True, log_on)
        off, url_off = start(args.model_uri, False, log_off)
        try:
            wait(on, url_on, log_on)
            wait(off, url_off, log_off)
            reference = _reference(url_on)
            print("| input px | request, monitoring off (ms) | on (ms) | difference | assess alone (ms) | "
                  "assess / request |")
            print("|---|---|---|---|---|---|")
            with httpx.Client(timeout=600) as client:
                for size in args.sizes:
                    image = source[:size, :size]
                    data = encode_png(image)
                    times: dict[str, list[float]] = {"on": [], "off": []}
                    answer = None
                    for i in range(args.requests + 2):  # the first two of each: warm-up, not counted
                        for name, url in (("on", url_on), ("off", url_off)) if i % 2 else (("off", url_off),
                                                                                           ("on", url_on)):
                            started = time.perf_counter()
                            response = client.post(f"{url}/v1/super-resolve", data={"scale": str(args.scale)},
                                                   files={"file": ("in.png", data, "image/png")})
                            elapsed = time.perf_counter() - started
                            response.raise_for_status()
                            if i >= 2:
                                times[name].append(elapsed)
                            if name == "on":
                                answer = response
                    output = decode_rgb(answer.content, max_pixels=10**9).astype(np.float32) / 255
                    lr = image.astype(np.float32) / 255
                    alone = []
                    for _ in range(args.requests):
                        started = time.perf_counter()
                        monitoring.assess(lr, None, output, args.scale, reference)
                        alone.append(time.perf_counter() - started)
                    t_on, t_off = statistics.median(times["on"]), statistics.median(times["off"])
                    t_alone = statistics.median(alone)
                    print(f"| {size} | {t_off * 1000:.1f} | {t_on * 1000:.1f} | {(t_on - t_off) / t_off:+.1%} | "
                          f"{t_alone * 1000:.2f} | {t_alone / t_off:.1%} |", flush=True)
        finally:
            for process in (on, off):
                process.terminate()
                process.wait(timeout=30)


def _reference(url: str) -> monitoring.Reference | None:
    """The served model's reference, read from its folder when MODEL_URI is one (for the in-process timing)."""
    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    path = Path(info.get("source", "")) / monitoring.REFERENCE_FILE
    if path.is_file():
        return monitoring.Reference.from_record(json.loads(path.read_text()))
    return None


if __name__ == "__main__":
    main()
