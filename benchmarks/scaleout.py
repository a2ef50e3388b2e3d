"""ETL and batch-prediction throughput in one process and on a local Dask cluster of 1 and 2 worker processes.

    python benchmarks/scaleout.py [--images 8] [--side 2000] [--files 16] [--tile 256] [--model models]

ETL: `hndsr etl` on `--images` real-image mosaics (the ten images of imagery/realsat, tiled into squares
of `--side` px, each a different image, so few tiles are duplicates), input megapixels per second. Prediction:
`hndsr predict` at x2 on `--files` crops of `--tile` px of the same images with the model in `--model` (the
default run's checkpoints, `make repro`), output megapixels per second. Each run is the whole command as a user
runs it, so a cluster's start-up (worker processes, each importing torch and, for prediction, loading the model)
is in the figure. Every run's outputs are compared with the one-process run's, byte for byte. Nothing here is a
test: it only measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REALSAT = Path(os.environ.get("HNDSR_REALSAT", REPO / "imagery" / "realsat"))
HNDSR = str(Path(sys.executable).parent / "hndsr")


def _images() -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(REALSAT.glob("*.png"))]


def _mosaic(image: np.ndarray, side: int) -> np.ndarray:
    reps = (-(-side // image.shape[0]), -(-side // image.shape[1]), 1)
    return np.ascontiguousarray(np.tile(image, reps)[:side, :side])


def _files(folder: Path) -> dict[str, bytes]:
    """Every output file, except the timing fields of predict's per-scene reports (`*.consistency.json`)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name.endswith(".consistency.json"):
            report = json.loads(data)
            for key in ("output", "seconds", "output_megapixels_per_s"):
                report.pop(key, None)
            data = json.dumps(report, sort_keys=True).encode()
        files[path.relative_to(folder).as_posix()] = data
    return files


def _run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return seconds


def _compare(root: Path, worker_counts: list[int], what: str, megapixels: float, command) -> None:
    """Run `command(out, workers)` for each worker count; print a table row per run, outputs compared."""
    print(f"| workers | seconds | {what} MP/s | vs one process | outputs |")
    print("|---|---|---|---|---|")
    base, reference = None, None
    for workers in worker_counts:
        out = root / f"{what}-{workers}"
        seconds = _run(command(out, workers), root)
        files = _files(out)
        reference = reference or files
        base = base or seconds
        label = "one process" if workers == 0 else f"{workers} (local Dask)"
        print(f"| {label} | {seconds:.1f} | {megapixels / seconds:.2f} | {base / seconds:.2f}x | "
              f"{'identical' if files == reference else 'DIFFERENT'} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="ETL source images (default: %(default)s)")
    parser.add_argument("--side", type=int, default=2000, help="their side in px (default: %(default)s)")
    parser.add_argument("--files", type=int, default=16, help="files to predict (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=256, help="their side in px (default: %(default)s)")
    parser.add_argument("--model", default=str(REPO / "models"), help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker processes to compare; 0 = one process, no cluster (default: %(default)s)")
    args = parser.parse_args()
    images = _images()
    print(f"cpus={os.cpu_count()} images from {REALSAT} ({len(images)})")
    with tempfile.TemporaryDirectory(prefix="hndsr-scaleout-") as tmp:
        root = Path(tmp)
        source = root / "source"
        source.mkdir()
        for i in range(args.images):
            Image.fromarray(_mosaic(images[i % len(images)], args.side)).save(source / f"scene_{i:03d}.png")
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["etl"]["source"] = str(source)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        megapixels = args.images * args.side**2 / 1e6
        print(f"\nETL: {args.images} images of {args.side}x{args.side} px ({megapixels:.1f} input megapixels), "
              f"scales {params['etl']['scales']}")
        _compare(root, args.workers, "input", megapixels,
                 lambda out, workers: [HNDSR, "etl", "--params", "params.yaml", "--out", str(out), "--workers",
                                       str(workers)])

        inputs = root / "inputs"
        inputs.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.files):
            image = _mosaic(images[i % len(images)], max(args.tile * 2, 512))
            y = int(rng.integers(0, image.shape[0] - args.tile))
            x = int(rng.integers(0, image.shape[1] - args.tile))
            Image.fromarray(image[y:y + args.tile, x:x + args.tile]).save(inputs / f"tile_{i:03d}.png")
        out_mp = args.files * (2 * args.tile) ** 2 / 1e6
        print(f"\npredict: {args.files} files of {args.tile}x{args.tile} px at x2 ({out_mp:.1f} output megapixels), "
              f"model {args.model}, its default steps")
        _compare(root, args.workers, "output", out_mp,
                 lambda out, workers: [HNDSR, "predict", str(inputs), "--out", str(out), "--scale", "2", "--model",
                                       args.model, "--workers", str(workers)])

if __name__ == "__main__":
    main()
