"""Load test of the HTTP server, side by side with `mlflow models serve` on the same registered version.

    python benchmarks/serve_load.py [--model-uri models:/hndsr@production] [--requests 24]
                                    [--concurrency 1 4 16] [--size 64] [--scale 4] [--steps DEFAULT]

Starts both servers as processes on loopback ports (MLFLOW_TRACKING_URI, default the local mlflow.db), sends
the same request (a --size x --size crop of a real Blue Marble image, --scale, the model's default DDIM steps,
seed 0) --requests times at each concurrency level, and prints throughput and p50/p95/p99 latency per server
and level, plus the share of answers that were not 200. Needs a registered model (`make repro`).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image(size: int) -> bytes:
    from PIL import Image

    from hndsr.images import encode_png

    reference = np.asarray(Image.open(REPO / "registry" / "reference_lr.png").convert("RGB"))
    tiles = np.tile(reference, (size // 64 + 1, size // 64 + 1, 1))
    return encode_png(np.ascontiguousarray(tiles[:size, :size]))


def _start(args: list[str], ready_url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    process = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{args[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit(f"{' '.join(args[:3])} not ready after 300 s: {log.read_text()[-2000:]}")


def _load(send, requests: int, concurrency: int) -> dict:
    latencies, codes, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def worker():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                start = time.perf_counter()
                status = send(client)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    codes.append(status)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [lat for lat, code in zip(latencies, codes, strict=True) if code == 200]
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else [ok[0] if ok else float("nan")] * 99
    return {"throughput": len(ok) / wall, "p50": q[49], "p95": q[94], "p99": q[98],
            "not_ok": 1 - len(ok) / len(codes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/hndsr@production")
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--size", type=int, default=64, help="LR edge in pixels")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's default)")
    args = parser.parse_args()

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    image = _image(args.size)
    logs = Path(tempfile.mkdtemp(prefix="serve-load-"))
    ours_port, mlflow_port = _free_port(), _free_port()
    ours = _start([str(BIN / "hndsr"), "serve", "--port", str(ours_port)], f"http://127.0.0.1:{ours_port}/readyz",
                  {**env, "MODEL_URI": args.model_uri, "HNDSR_POLL_S": "0"}, logs / "hndsr.log")
    info = httpx.get(f"http://127.0.0.1:{ours_port}/v1/model").json()
    steps = info["default_steps"] if args.steps is None else args.steps
    theirs = _start([str(BIN / "mlflow"), "models", "serve", "-m", args.model_uri, "--env-manager", "local",
                     "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1", "-t", "600"],
                    f"http://127.0.0.1:{mlflow_port}/ping", env, logs / "mlflow.log")
    payload = {"dataframe_split": {"columns": ["image", "scale", "steps", "seed"],
                                   "data": [[base64.b64encode(image).decode(), args.scale, steps, 0]]}}

    def send_ours(client: httpx.Client) -> int:
        files = {"file": ("in.png", image, "image/png")}
        data = {"scale": str(args.scale), "steps": str(steps), "seed": "0"}
        return client.post(f"http://127.0.0.1:{ours_port}/v1/super-resolve", files=files, data=data).status_code

    def send_mlflow(client: httpx.Client) -> int:
        return client.post(f"http://127.0.0.1:{mlflow_port}/invocations", json=payload).status_code

    print(f"model {args.model_uri} (version {info['version']}) on {info['device']}; {args.size}x{args.size} input "
          f"at x{args.scale:g}, {steps} DDIM steps; {args.requests} requests per level; torch threads "
          f"{os.cpu_count()} cores")
    print(f"{'server':<22} {'concurrency':>11} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'not 200':>8}")
    try:
        for concurrency in args.concurrency:
            for name, send in (("hndsr serve", send_ours), ("mlflow models serve", send_mlflow)):
                send(httpx.Client(timeout=600))  # warm
                r = _load(send, args.requests, concurrency)
                print(f"{name:<22} {concurrency:>11} {r['throughput']:>7.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} "
                      f"{r['p99']:>7.2f} {r['not_ok']:>8.0%}", flush=True)
    finally:
        for process in (ours, theirs):
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
