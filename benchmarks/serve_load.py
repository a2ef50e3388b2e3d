"""Load test of the HTTP server, side by side with `mlflow models serve` on the same registered version.

    python benchmarks/serve_load.py [--model-uri models:/hndsr@production] [--sizes 64 128 256 512]
                                    [--concurrency 1 8] [--requests 16] [--scale 4] [--steps DEFAULT]

Starts both servers as processes on loopback ports with their defaults (MLFLOW_TRACKING_URI, default the local
mlflow.db; `mlflow models serve` as MLflow runs the registered pyfunc: float32, whole image, one worker), then
for every input size and concurrency level sends the same request (a size x size crop of a real Blue Marble
image, --scale, the model's default DDIM steps, seed 0) to each server in turn, and prints throughput, p50 /
p95 / p99 latency and the share of answers that were not 200, then a table of the throughput ratio
(hndsr serve / mlflow models serve). Requests per level: --requests at 128 px, scaled by the pixel count for
other sizes, at least 8 and at least the concurrency; where there are at least twice as many as the concurrency,
each server gets two alternating rounds of half of them, so a drift in the machine's speed favours neither. Needs a registered model (`make repro`).

    python benchmarks/serve_load.py --rollout [--sizes 128 256] [--concurrency 1 8]

With --rollout, instead: `hndsr serve` alone, three times: without a roll-out, with a 10 % canary and with 10 %
shadow runs (HNDSR_CANARY_WEIGHT / HNDSR_SHADOW_SHARE = 0.1), side by side with throughput and p95 and their
ratio to the run without. The candidate is a second registered version of the production weights, registered in
a temporary copy of the MLflow database (your registry is not touched), so the numbers measure the roll-out
machinery (routing, the outcome window, shadow runs), not a different model. Requests come from 50 named clients
(a temporary clients file), so the canary's sticky split sends about a tenth of them to the candidate.
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

    reference = np.asarray(Image.open(REPO / "hndsr" / "reference_lr.png").convert("RGB"))
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


def _load(send, requests: int, concurrency: int) -> tuple[list[float], list[int], float]:
    """`requests` requests from `concurrency` client threads: (latencies, status codes, wall seconds)."""
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
    return latencies, codes, time.perf_counter() - start


def _summary(rounds: list[tuple[list[float], list[int], float]]) -> dict:
    latencies = [lat for r in rounds for lat in r[0]]
    codes = [code for r in rounds for code in r[1]]
    wall = sum(r[2] for r in rounds)
    ok = [lat for lat, code in zip(latencies, codes, strict=True) if code == 200]
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else [ok[0] if ok else float("nan")] * 99
    return {"throughput": len(ok) / wall, "p50": q[49], "p95": q[94], "p99": q[98],
            "not_ok": 1 - len(ok) / len(codes)}


def requests_for(size: int, base: int, concurrency: int) -> int:
    return max(8, concurrency, round(base * (128 / size) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/hndsr@production")
    parser.add_argument("--requests", type=int, default=16, help="requests per level at 128 px (scaled by size)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="LR edges in pixels")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's default)")
    parser.add_argument("--rollout", action="store_true", help="compare no roll-out, a 10 %% canary and 10 %% shadow")
    args = parser.parse_args()
    if args.rollout:
        rollout(args)
        return

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    logs = Path(tempfile.mkdtemp(prefix="serve-load-"))
    ours_port, mlflow_port = _free_port(), _free_port()
    ours = _start([str(BIN / "hndsr"), "serve", "--port", str(ours_port)], f"http://127.0.0.1:{ours_port}/readyz",
                  {**env, "MODEL_URI": args.model_uri, "HNDSR_POLL_S": "0"}, logs / "hndsr.log")
    theirs = None
    try:
        info = httpx.get(f"http://127.0.0.1:{ours_port}/v1/model").json()
        steps = info["default_steps"] if args.steps is None else args.steps
        theirs = _start([str(BIN / "mlflow"), "models", "serve", "-m", args.model_uri, "--env-manager", "local",
                         "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1", "-t", "600"],
                        f"http://127.0.0.1:{mlflow_port}/ping", env, logs / "mlflow.log")
        engine, inference = info["engine"], info["inference"]
        print(f"model {args.model_uri} (version {info['version']}) on {info['device']}; x{args.scale:g}, {steps} DDIM "
              f"steps; {os.cpu_count()} cores. hndsr serve: {inference['precision']}"
              f"{', compiled UNet' if inference['compiled'] else ''}, passes of up to {engine['pass_megapixels']:g} "
              f"output MP, up to {engine['max_batch']} tiles per pass; mlflow models serve: float32, whole image")
        print(f"{'size':>5} {'server':<20} {'concurrency':>11} {'requests':>8} {'req/s':>7} {'p50 s':>7} "
              f"{'p95 s':>7} {'p99 s':>7} {'not 200':>8}")
        ratios: dict[tuple[int, int], float] = {}
        for size in args.sizes:
            image = _image(size)
            payload = {"dataframe_split": {"columns": ["image", "scale", "steps", "seed"],
                                           "data": [[base64.b64encode(image).decode(), args.scale, steps, 0]]}}

            def send_ours(client: httpx.Client, image=image) -> int:
                files = {"file": ("in.png", image, "image/png")}
                data = {"scale": str(args.scale), "steps": str(steps), "seed": "0"}
                return client.post(f"http://127.0.0.1:{ours_port}/v1/super-resolve", files=files,
                                   data=data).status_code

            def send_mlflow(client: httpx.Client, payload=payload) -> int:
                return client.post(f"http://127.0.0.1:{mlflow_port}/invocations", json=payload).status_code

            for concurrency in args.concurrency:
                requests = requests_for(size, args.requests, concurrency)
                # Two rounds each, alternating servers, so a drift in the machine's speed (seen here: +-15 % over
                # minutes) does not favour either.
                senders = {"hndsr serve": send_ours, "mlflow models serve": send_mlflow}
                rounds: dict[str, list] = {name: [] for name in senders}
                for send in senders.values():
                    with httpx.Client(timeout=600) as client:
                        send(client)  # warm
                halves = [requests // 2, requests - requests // 2] if requests >= 2 * concurrency else [requests]
                for half in halves:
                    for name, send in senders.items():
                        rounds[name].append(_load(send, half, concurrency))
                rates = {}
                for name in senders:
                    r = _summary(rounds[name])
                    rates[name] = r["throughput"]
                    print(f"{size:>5} {name:<20} {concurrency:>11} {requests:>8} {r['throughput']:>7.2f} "
                          f"{r['p50']:>7.2f} {r['p95']:>7.2f} {r['p99']:>7.2f} {r['not_ok']:>8.0%}", flush=True)
                ratios[size, concurrency] = rates["hndsr serve"] / rates["mlflow models serve"]
        print("\nthroughput ratio, hndsr serve / mlflow models serve:")
        print(f"{'size':>5} " + " ".join(f"{'c' + str(c):>7}" for c in args.concurrency))
        for size in args.sizes:
            print(f"{size:>5} " + " ".join(f"{ratios[size, c]:>7.2f}" for c in args.concurrency))
    finally:
        for process in (ours, theirs):
            if process is not None:
                process.terminate()
                process.wait(timeout=60)


def rollout(args) -> None:
    """hndsr serve without a roll-out, with a 10 % canary and with 10 % shadow, side by side."""
    import random
    import shutil

    import yaml

    from registry.promote import PYFUNC_FILE
    from registry.store import Registry
    from serving.clients import key_hash

    source = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    if not source.startswith("sqlite:///"):
        sys.exit("--rollout copies a local SQLite registry (MLFLOW_TRACKING_URI=sqlite:///...)")
    work = Path(tempfile.mkdtemp(prefix="serve-rollout-"))
    shutil.copy(source[len("sqlite:///"):], work / "mlflow.db")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    name = args.model_uri.removeprefix("models:/").split("@")[0]
    os.chdir(work)  # before MLflow's store is made: the copy's new artifacts go under work/mlruns
    registry = Registry(name, uri)
    production = registry.alias_version("production")
    checkpoints = registry.download_checkpoints(production, work / "download" / "checkpoints")
    candidate = registry.register(checkpoints, python_model=PYFUNC_FILE, experiment="serve-load-rollout",
                                  tags={}, run_tags={}, signature=None, input_example=None,
                                  pip_requirements=["torch"]).version
    registry.move_alias("candidate", candidate)
    keys = {f"client-{i:02d}": f"benchmark-key-{i:02d}-{'x' * 20}" for i in range(50)}
    (work / "clients.yaml").write_text(yaml.safe_dump({"clients": {n: {"key_sha256": key_hash(k)}
                                                                    for n, k in keys.items()}}))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri,
           "MODEL_URI": args.model_uri, "HNDSR_POLL_S": "0", "HNDSR_API_KEYS_FILE": str(work / "clients.yaml")}
    modes = {"no roll-out": {}, "canary 10 %": {"HNDSR_CANARY_WEIGHT": "0.1"},
             "shadow 10 %": {"HNDSR_SHADOW_SHARE": "0.1"}}
    results: dict[tuple[str, int, int], dict] = {}
    print(f"model {args.model_uri} v{production}, candidate v{candidate} (the same weights, registered again in a "
          f"copy of the database); x{args.scale:g}; {os.cpu_count()} cores; 50 clients; logs and the copy: {work}")
    print(f"{'size':>5} {'mode':<12} {'concurrency':>11} {'requests':>8} {'req/s':>7} {'p95 s':>7} {'not 200':>8} "
          f"{'on candidate':>12}")
    for mode, extra in modes.items():
        port = _free_port()
        process = _start([str(BIN / "hndsr"), "serve", "--port", str(port)], f"http://127.0.0.1:{port}/readyz",
                         {**env, **extra}, work / f"{mode.split()[0]}.log")
        try:
            if extra:  # the candidate loads in the background after start-up
                deadline = time.monotonic() + 300
                while len(httpx.get(f"http://127.0.0.1:{port}/rollout").json()["versions"]) < 2:
                    if time.monotonic() > deadline:
                        sys.exit(f"the candidate did not load: {(work / f'{mode.split()[0]}.log').read_text()[-2000:]}")
                    time.sleep(0.5)
            steps = httpx.get(f"http://127.0.0.1:{port}/v1/model", headers={
                "Authorization": f"Bearer {keys['client-00']}"}).json()["default_steps"] if args.steps is None \
                else args.steps
            for size in args.sizes:
                image = _image(size)
                picks = random.Random(0)
                versions: list[str] = []

                def send(client: httpx.Client, image=image, picks=picks, versions=versions, port=port,
                         steps=steps) -> int:
                    key = keys[f"client-{picks.randrange(50):02d}"]
                    answer = client.post(f"http://127.0.0.1:{port}/v1/super-resolve",
                                         files={"file": ("in.png", image, "image/png")},
                                         data={"scale": str(args.scale), "steps": str(steps), "seed": "0"},
                                         headers={"Authorization": f"Bearer {key}"})
                    versions.append(answer.headers.get("x-model-version", ""))
                    return answer.status_code

                for concurrency in args.concurrency:
                    requests = requests_for(size, args.requests, concurrency)
                    with httpx.Client(timeout=600) as client:
                        send(client)  # warm
                    versions.clear()
                    r = _summary([_load(send, requests, concurrency)])
                    share = sum(v == str(candidate) for v in versions) / max(1, len(versions))
                    results[mode, size, concurrency] = r
                    print(f"{size:>5} {mode:<12} {concurrency:>11} {requests:>8} {r['throughput']:>7.2f} "
                          f"{r['p95']:>7.2f} {r['not_ok']:>8.0%} {share:>12.0%}", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    print("\nagainst no roll-out: throughput ratio / p95 ratio")
    print(f"{'size':>5} {'concurrency':>11} " + " ".join(f"{m:>22}" for m in list(modes)[1:]))
    for size in args.sizes:
        for concurrency in args.concurrency:
            base = results["no roll-out", size, concurrency]
            cells = [f"{results[m, size, concurrency]['throughput'] / base['throughput']:>10.2f} / "
                     f"{results[m, size, concurrency]['p95'] / base['p95']:<9.2f}" for m in list(modes)[1:]]
            print(f"{size:>5} {concurrency:>11} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
