"""Inference latency of the trained model and its distance to the hardware limit: an LR input (default 128x128)
at scale 4 with steps = 0 (prior only) and the model's default DDIM steps, in float32 eager (what
`mlflow models serve` runs) and in the mode the server chooses at start-up (inference/acceleration.py: bfloat16
and/or a compiled UNet where the checks pass), on the CPU and, when present, on the GPU.

    python benchmarks/inference_latency.py [--models models] [--repeat 5] [--size 128] [--scale 4]

Per line: median and min latency over --repeat runs after one warm-up run; GFLOP per request (convolutions and
matrix products, counted by torch.utils.flop_counter on one run); achieved GFLOP/s (GFLOP / median); and that
as a share of the machine's measured peak for the precision, a matmul probe (the best of square float32 and
bfloat16 matrix products of 1024 to 4096, the fastest thing the device does).
Needs the trained checkpoints (`make repro`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from hndsr.checkpoint import load_model
from inference.acceleration import Acceleration, accelerate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best GFLOP/s of square matrix products on `device` in `dtype`."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for i in range(4):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            if i:
                best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _run(model, lr, scale, steps, acceleration: Acceleration, device):
    with torch.inference_mode(), acceleration.autocast(device):
        return model.super_resolve(lr, scale, steps=steps, seed=0)


def _time(model, lr, scale, steps, acceleration, device, repeat) -> list[float]:
    times = []
    for i in range(repeat + 1):
        _sync(device)
        start = time.perf_counter()
        _run(model, lr, scale, steps, acceleration, device)
        _sync(device)
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--scale", type=float, default=4.0)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    base = load_model(args.models)
    default = base.defaults.steps
    print(f"LR {args.size}x{args.size} at x{args.scale:g}; default steps {default}; cpu threads "
          f"{torch.get_num_threads()}")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
        peaks = {"float32": matmul_peak(device, torch.float32), "bfloat16": matmul_peak(device, torch.bfloat16)}
        print(f"\n{name}: matmul peak float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")
        eager = copy.deepcopy(base).to(device)
        served = copy.deepcopy(base).to(device)
        acceleration = accelerate(served, device)
        label = acceleration.precision + (" compiled" if acceleration.compiled else "")
        lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
        print(f"{'mode':<20} {'steps':>5} {'median ms':>10} {'min ms':>9} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>8}")
        for mode, model, acc in (("float32 eager", eager, Acceleration()), (f"server: {label}", served, acceleration)):
            for steps in sorted({0, default}):
                with FlopCounterMode(display=False) as counter:
                    _run(model, lr, args.scale, steps, acc, device)
                gflop = counter.get_total_flops() / 1e9
                times = _time(model, lr, args.scale, steps, acc, device, args.repeat)
                rate = gflop / statistics.median(times)
                print(f"{mode:<20} {steps:>5} {statistics.median(times) * 1000:>10.1f} {min(times) * 1000:>9.1f} "
                      f"{gflop:>7.1f} {rate:>8.0f} {rate / peaks[acc.precision]:>8.0%}", flush=True)


if __name__ == "__main__":
    main()
