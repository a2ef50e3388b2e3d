"""`hndsr predict` on whole scenes: output megapixels per second and peak resident memory by scene size.

Scenes of N x N pixels are mosaics of a real raster (default imagery/geotiff/landsat8_rgb_uint16.tif,
Landsat 8 true colour, 16-bit), mirrored tile by tile so no seam is a step, written window by window as tiled
GeoTIFFs with that raster's CRS and a 60 m grid. Each size runs `hndsr predict` in its own process; its peak
resident set (the kernel's ru_maxrss for that child), wall time (including the Cloud-Optimized GeoTIFF's
compression and overviews) and the output file's size against its raw pixels are printed. Memory flat in the
scene size is what window-by-window reading and writing buys; the output size grows with N^2.

    python benchmarks/predict_scene.py                       # 2000, 8000 and 16000 px, x2, the model's steps
    python benchmarks/predict_scene.py --sizes 2000 4000 --steps 0

The model is MODEL_URI or --model (default: models/, what `make repro` trained). Engine settings come from the
environment as for `hndsr serve` (HNDSR_PASS_MEGAPIXELS, HNDSR_WORKERS, ...).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "imagery" / "geotiff" / "landsat8_rgb_uint16.tif"


def build_mosaic(source: Path, size: int, target: Path, *, distinct: bool = False) -> None:
    """An N x N mosaic of `source`, mirrored in alternate rows and columns, written one tile row at a time.
    `distinct`: each copy's values shifted by its index (1..1000 units), so no two copies hold equal pixels."""
    with rasterio.open(source) as src:
        tile = src.read()
        profile = {"driver": "GTiff", "width": size, "height": size, "count": src.count, "dtype": src.dtypes[0],
                   "crs": src.crs, "transform": Affine(src.res[0], 0, src.transform.c, 0, -src.res[1], src.transform.f),
                   "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    th, tw = tile.shape[1:]
    flips = {(fy, fx): tile[:, :: -1 if fy else 1, :: -1 if fx else 1] for fy in (0, 1) for fx in (0, 1)}
    with rasterio.open(target, "w", **profile) as dst:
        for row, y in enumerate(range(0, size, th)):
            height = min(th, size - y)
            copies = [flips[row % 2, col % 2][:, :height] for col in range((size + tw - 1) // tw)]
            if distinct:
                copies = [c + np.asarray(1 + (row * len(copies) + col) % 1000, dtype=c.dtype)
                          for col, c in enumerate(copies)]
            strip = np.concatenate(copies, axis=2)[:, :, :size]
            dst.write(strip, window=Window(0, y, size, height))


def build_in_child(source: Path, size: int, target: Path, *, distinct: bool = False) -> None:
    """`build_mosaic` in a process of its own, so this one stays small: a child's peak RSS (ru_maxrss) starts from
    its parent's resident size at fork, which would otherwise grow with the mosaic built here."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=build_mosaic, args=(source, size, target), kwargs={"distinct": distinct})
    process.start()
    process.join()
    if process.exitcode != 0:
        sys.exit(f"building the {size} px mosaic failed (exit {process.exitcode})")


def run(scene: Path, out: Path, args: argparse.Namespace) -> tuple[float, int]:
    command = [str(Path(sys.executable).parent / "hndsr"), "predict", str(scene), "--out", str(out), "--scale",
               str(args.scale), "--model", args.model, "--overwrite"]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"hndsr predict failed on {scene.name}: {process.stderr.read()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 16000], help="scene edges in pixels")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--model", default=os.environ.get("MODEL_URI", str(REPO / "models")))
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()
    print(f"predict_scene: mosaics of {args.source.name}, x{args.scale:g}, steps "
          f"{'model default' if args.steps is None else args.steps}, model {args.model}, {os.cpu_count()} CPUs")
    print(f"{'scene px':>9} {'output MP':>10} {'seconds':>9} {'output MP/s':>12} {'peak RSS MiB':>13} "
          f"{'file MB':>9} {'file/raw':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            scene = Path(tmp) / f"mosaic_{size}.tif"
            build_in_child(args.source, size, scene)
            seconds, peak = run(scene, Path(tmp) / "out", args)
            out_mp = round(size * args.scale) ** 2 / 1e6
            written = Path(tmp) / "out" / scene.name
            with rasterio.open(written) as out:
                raw = out.width * out.height * out.count * np.dtype(out.dtypes[0]).itemsize
            file_mb = written.stat().st_size / 1e6
            print(f"{size:>9} {out_mp:>10.1f} {seconds:>9.1f} {out_mp / seconds:>12.3f} {peak / 2**20:>13.0f} "
                  f"{file_mb:>9.1f} {file_mb * 1e6 / raw:>9.2f}", flush=True)
            scene.unlink()
            for written in (Path(tmp) / "out").glob("*"):
                written.unlink()


if __name__ == "__main__":
    main()
