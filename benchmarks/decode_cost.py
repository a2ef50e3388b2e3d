"""What decoding a many-band upload costs the server: time and resident memory of `hndsr serve` for rasters with
many bands of which three are used.

    python benchmarks/decode_cost.py [--model-uri models:/hndsr@production] [--cases 2000x256 64x1024 64x2000]

Starts `hndsr serve` (MLFLOW_TRACKING_URI as set, default the local mlflow.db; upload and input limits raised
so only the band limits apply), then for each case BANDSxSIZE posts a deflate-compressed, tiled, pixel-
interleaved uint8 raster of SIZE x SIZE px and BANDS bands with `bands=1,2,3`, x2, steps 0, and prints the
answer, its time and the server's resident memory before and after (from /metrics; cumulative over the cases,
in one process, as a server lives). To compare with another commit, run it with that commit's checkout first on
PYTHONPATH (the server process inherits it).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

BIN = Path(sys.executable).parent
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)  # the generated rasters have no CRS


def raster(bands: int, size: int) -> bytes:
    """A smooth ramp per band: small when compressed, `bands x size^2` bytes when decoded."""
    memory = MemoryFile()
    with memory.open(driver="GTiff", width=size, height=size, count=bands, dtype="uint8", interleave="pixel",
                     compress="deflate", tiled=True, blockxsize=256, blockysize=256) as dataset:
        ramp = np.add.outer(np.arange(size), np.arange(size))
        for band in range(bands):
            dataset.write(((ramp + band) % 200).astype("uint8"), band + 1)
    return memory.read()


def resident_mb(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.M).group(1)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/hndsr@production")
    parser.add_argument("--cases", nargs="+", default=["2000x256", "64x1024", "64x2000"], metavar="BANDSxSIZE")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MODEL_URI": args.model_uri, "HNDSR_MAX_UPLOAD_BYTES": "200000000",
           "HNDSR_MAX_INPUT_PIXELS": "16000000", "HNDSR_MAX_OUTPUT_PIXELS": "64000000", "HNDSR_POLL_S": "0"}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([str(BIN / "hndsr"), "serve", "--port", str(port)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"the server did not start:\n{log.read().decode()[-3000:]}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            print("| bands x size | upload MB | decoded MB | answer | seconds | RSS before -> after MB |")
            print("|---|---|---|---|---|---|")
            for case in args.cases:
                bands, size = map(int, case.split("x"))
                data = raster(bands, size)
                before, start = resident_mb(url), time.perf_counter()
                answer = httpx.post(f"{url}/v1/super-resolve", files={"file": ("in.tif", data)},
                                    data={"scale": "2", "steps": "0", "bands": "1,2,3"}, timeout=1200)
                seconds = time.perf_counter() - start
                outcome = str(answer.status_code) + ("" if answer.status_code == 200 else f" {answer.json()['error']}")
                print(f"| {bands} x {size} | {len(data) / 1e6:.1f} | {bands * size * size / 1e6:.0f} | {outcome} | "
                      f"{seconds:.2f} | {before:.0f} -> {resident_mb(url):.0f} |", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
