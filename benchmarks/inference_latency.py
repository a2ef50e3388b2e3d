"""Inference latency of the trained model: a 128x128 LR input at scale 4 (512x512 output), with steps = 0
(prior only) and with the model's default DDIM steps, on the CPU and, when present, on the GPU.

    python benchmarks/inference_latency.py [--models models] [--repeat 5] [--size 128] [--scale 4]

Prints the median and min over `--repeat` runs after one warm-up run. Needs the trained checkpoints
(`make repro`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hndsr.checkpoint import load_model


def _time(model, lr, scale, steps, device, repeat) -> list[float]:
    times = []
    for i in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.super_resolve(lr, scale, steps=steps, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
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
    model = load_model(args.models)
    default = model.defaults.steps
    print(f"LR {args.size}x{args.size} at scale {args.scale:g}; default steps {default}; "
          f"cpu threads {torch.get_num_threads()}")
    for device in devices:
        model = model.to(device)
        lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        for steps in sorted({0, default}):
            times = _time(model, lr, args.scale, steps, device, args.repeat)
            print(f"{name:24s} steps {steps:2d}: median {statistics.median(times) * 1000:8.1f} ms  "
                  f"min {min(times) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
