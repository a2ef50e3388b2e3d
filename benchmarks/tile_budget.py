"""How the engine's pass budget (`HNDSR_PASS_MEGAPIXELS`), batch size (`HNDSR_MAX_BATCH`) and workers
(`HNDSR_WORKERS`) trade speed on this machine: the measurements behind the CPU defaults in
inference/acceleration.py.

    python benchmarks/tile_budget.py [--models models] [--budgets 0.27 0.6 1.1 2.2 4.3] [--sizes 128 256 512]
                                     [--scale 4] [--repeat 2] [--device auto]

For each budget, requests of each LR size (a real Blue Marble crop, the model's default DDIM steps) go through
the serving engine one at a time, as the server runs them (same precision checks, tile plan and blending):
the table shows the tiles per request, seconds per request (median of --repeat after a warm-up) and seconds per
output megapixel. Then 8 concurrent 128 px requests run with max_batch 1, 2, 4 and 8 (budget large enough for
all) to show whether batching tiles of several requests pays, and with 1, 2 and 3 engine workers (passes in
flight); last, tiled against whole-image output (PSNR) for a 512 px input at --scale and 2.5, with 0 and the
default DDIM steps. On CUDA the peak memory per pass is printed too.
Needs the trained checkpoints (`make repro`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hndsr.degradation import hr_size
from hndsr.raster import DataSpec
from inference import acceleration, loader
from inference.engine import Engine

REFERENCE = Path(__file__).resolve().parents[1] / "hndsr" / "reference_lr.png"


RGB = DataSpec.fixed()  # 8-bit RGB to model values and back, as the server does


def image(size: int) -> np.ndarray:
    """The reference crop tiled to size x size, as the engine takes it: (h, w, 3) float32 model values."""
    reference = np.asarray(Image.open(REFERENCE).convert("RGB"))
    return RGB.image_to_model(np.tile(reference, (size // 64 + 1, size // 64 + 1, 1))[:size, :size])


def timed(engine: Engine, model, images: list[np.ndarray], scale: float, steps: int) -> tuple[float, int]:
    start = time.perf_counter()
    jobs = [engine.submit(model, img, scale, steps, i, 3600) for i, img in enumerate(images)]
    for job in jobs:
        job.future.result()
    return time.perf_counter() - start, len(jobs[0].tiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.27, 0.6, 1.1, 2.2, 4.3],
                        help="pass budgets to try, output megapixels")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="LR edges, pixels")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = loader.pick_device(args.device)
    acceleration.keep_freed_memory()  # as `hndsr serve` does
    model = loader.load(args.models, device)
    steps = model.model.defaults.steps
    print(f"{device} ({torch.get_num_threads()} threads), {model.acceleration.precision}; x{args.scale:g}, "
          f"{steps} DDIM steps")
    print(f"{'budget MP':>9} {'LR px':>6} {'tiles':>5} {'s/request':>9} {'s/MP':>6}" +
          (f" {'peak MB':>8}" if device.type == "cuda" else ""))
    for budget in args.budgets:
        engine = Engine(device, pass_pixels=int(budget * 1e6), max_batch=1)
        try:
            for size in args.sizes:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timed(engine, model, [image(size)], args.scale, steps)  # warm-up
                runs = [timed(engine, model, [image(size)], args.scale, steps) for _ in range(args.repeat)]
                seconds, tiles = statistics.median(r[0] for r in runs), runs[0][1]
                megapixels = hr_size(size, args.scale) ** 2 / 1e6
                peak = f" {torch.cuda.max_memory_allocated(device) / 1e6:>8.0f}" if device.type == "cuda" else ""
                print(f"{budget:>9.2f} {size:>6} {tiles:>5} {seconds:>9.2f} {seconds / megapixels:>6.2f}{peak}",
                      flush=True)
        finally:
            engine.close()
    def eight_requests(warm: int, **engine_options) -> float:
        """Median seconds for 8 concurrent 128 px requests through an engine with `engine_options`."""
        engine = Engine(device, **engine_options)
        try:
            timed(engine, model, [image(128)] * warm, args.scale, steps)  # warm-up
            return statistics.median(timed(engine, model, [image(128)] * 8, args.scale, steps)[0]
                                     for _ in range(args.repeat))
        finally:
            engine.close()

    megapixels = 8 * hr_size(128, args.scale) ** 2 / 1e6
    print(f"\n8 concurrent 128 px requests, budget {megapixels:.1f} MP:")
    print(f"{'max_batch':>9} {'s total':>8} {'s/MP':>6}")
    for max_batch in (1, 2, 4, 8):
        seconds = eight_requests(max_batch, pass_pixels=int(megapixels * 1e6) + 1, max_batch=max_batch)
        print(f"{max_batch:>9} {seconds:>8.2f} {seconds / megapixels:>6.2f}", flush=True)
    print(f"\n8 concurrent 128 px requests, budget {megapixels / 8:.2f} MP, one tile per pass:")
    print(f"{'workers':>9} {'s total':>8} {'req/s':>6}")
    for workers in (1, 2, 3):
        seconds = eight_requests(workers, pass_pixels=hr_size(128, args.scale) ** 2, workers=workers)
        print(f"{workers:>9} {seconds:>8.2f} {8 / seconds:>6.2f}", flush=True)

    print("\ntiled (this budget list's first and the default 0.6 MP) against whole-image output, 512 px input:")
    print(f"{'scale':>5} {'steps':>5} {'budget MP':>9} {'tiles':>5} {'PSNR dB':>8} {'max diff':>8}")
    whole_engine = Engine(device, pass_pixels=10**9)
    try:
        for scale in (args.scale, 2.5):
            for steps_now in (0, steps):
                whole = RGB.image_from_model(
                    whole_engine.submit(model, image(512), scale, steps_now, 0, 3600).future.result(), "uint8")
                for budget in sorted({args.budgets[0], 0.6}):
                    engine = Engine(device, pass_pixels=int(budget * 1e6))
                    try:
                        job = engine.submit(model, image(512), scale, steps_now, 0, 3600)
                        tiled = RGB.image_from_model(job.future.result(), "uint8")
                    finally:
                        engine.close()
                    difference = tiled.astype(np.float64) - whole.astype(np.float64)
                    psnr = 10 * np.log10(255**2 / max(np.mean(difference**2), 1e-12))
                    print(f"{scale:>5g} {steps_now:>5} {budget:>9.2f} {len(job.tiles):>5} {psnr:>8.1f} "
                          f"{np.abs(difference).max():>8.0f}", flush=True)
    finally:
        whole_engine.close()


if __name__ == "__main__":
    main()
