"""`hndsr etl` on one large GeoTIFF scene: input megapixels per second and peak resident memory by scene size.

The scenes are the mosaics of benchmarks/predict_scene.py (a real 16-bit Landsat 8 raster mirrored tile by tile,
tiled GeoTIFF), each copy's values shifted a little so that no tile is a duplicate of another and all are kept. Each size runs `hndsr etl` in its own process on a folder holding only that scene (120 px tiles,
scales 2, 3 and 4, image groups); its peak resident set (ru_maxrss of that child) and wall time are printed.
The ETL reads a raster one row of tiles at a time and keeps three rows of candidate tiles for the guard band, so
memory should stay flat in the scene size while the Parquet output grows with it.

    python benchmarks/etl_scene.py                      # 2000, 8000 and 16000 px
    python benchmarks/etl_scene.py --sizes 2000 4000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_scene import SOURCE, build_in_child  # noqa: E402  (the same scenes as the predict benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 16000])
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()
    print(f"source {args.source.name}; 120 px tiles, scales 2, 3, 4")
    print(f"{'scene':>12} {'seconds':>8} {'MP/s in':>8} {'peak MiB':>9}  summary")
    with tempfile.TemporaryDirectory(prefix="hndsr-etl-scene-") as tmp:
        for size in args.sizes:
            work = Path(tmp) / str(size)
            (work / "scene").mkdir(parents=True)
            build_in_child(args.source, size, work / "scene" / "mosaic.tif", distinct=True)
            seconds, peak_kib, summary = _measure(work)
            print(f"{size:>6} x {size:<5} {seconds:>8.1f} {size * size / 1e6 / seconds:>8.2f} {peak_kib / 1024:>9.0f}"
                  f"  {summary}", flush=True)


def _measure(work: Path) -> tuple[float, int, str]:
    params = {"etl": {"source": str(work / "scene"), "tile_size": 120, "scales": [2, 3, 4], "min_tile_std": 1.0,
                      "splits": {"train": 1.0, "val": 0.0, "test": 0.0},  # one scene is one group
                      "radiometry": {"method": "fixed", "scale": {"16bit": 40000}}}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    command = [str(Path(sys.executable).parent / "hndsr"), "etl", "--params", "params.yaml", "--out", "processed"]
    start = time.perf_counter()
    with open(work / "stdout.txt", "w") as stdout:
        process = subprocess.Popen(command, cwd=work, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hndsr etl failed: {process.stderr.read()[-2000:]}")
    summary = (work / "stdout.txt").read_text().strip().splitlines()[-1]
    return seconds, usage.ru_maxrss, summary


if __name__ == "__main__":
    main()
