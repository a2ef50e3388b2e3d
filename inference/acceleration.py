"""Cheaper arithmetic where it is safe: bfloat16 and compiled graphs, each kept only when a start-up check
shows the output within tolerance of float32.

At load (and at every hot reload) `accelerate` runs the reference input (hndsr/reference_lr.png, 64x64) at the
model's smallest and largest scale with the default DDIM steps and seed 0, first in float32 eager (the model's
own output, what `mlflow models serve` returns), then in each cheaper mode it may use:

1. bfloat16 (`HNDSR_PRECISION=auto`, on CUDA with bfloat16 support and on CPUs with bfloat16 instructions):
   autocast to bfloat16, with the convolutional networks in channels-last layout (the layout oneDNN's and
   cuDNN's bfloat16 kernels run fastest in); the Fourier layers stay float32.
2. a compiled diffusion UNet (`HNDSR_COMPILE`: `auto` = on CUDA only, `on`, `off`): `torch.compile` with
   dynamic shapes, warmed here on the reference shapes (and on a batch of two when batches can hold more).

A mode is kept only if the PSNR between its output and the float32 output, on both scales, is at least
`HNDSR_MIN_PSNR_DB` (default 45 dB; measured on the default Blue Marble model: bfloat16 54 dB). A failed check,
or a failure to compile, logs the reason and leaves that mode off: the worst case is float32 eager, exactly the
model's own output. Every check, with its numbers, is in `Acceleration.report()` (shown on `/v1/model`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from hndsr.reference import reference_input

log = logging.getLogger("hndsr.inference")


@dataclass
class Acceleration:
    """How a loaded model runs: its precision, whether its UNet is compiled, and the checks that decided it."""

    precision: str = "float32"  # "float32" or "bfloat16"
    compiled: bool = False
    checks: list[dict] = field(default_factory=list)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def report(self) -> dict:
        return {"precision": self.precision, "compiled": self.compiled,
                "layout": "channels_last" if self.precision == "bfloat16" else "contiguous", "checks": self.checks}


def bfloat16_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the device has fast bfloat16 arithmetic, and why not."""
    if device.type == "cuda":
        return (True, "") if torch.cuda.is_bf16_supported() else (False, "this GPU has no bfloat16 support")
    if device.type == "cpu":
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True, ""
        return False, "this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)"
    return False, f"no bfloat16 path for {device.type}"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images in [0, 1] (inf when identical)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def verdict(mode: str, got: list[torch.Tensor], reference: list[torch.Tensor], min_psnr_db: float) -> dict:
    """A mode's check record: passed when every output is finite and within `min_psnr_db` of float32. Every value
    is JSON (an output holding NaN or infinity fails with that detail, never a NaN figure)."""
    if not all(bool(torch.isfinite(a).all()) for a in got):
        return {"mode": mode, "passed": False, "tolerance_db": min_psnr_db,
                "detail": "its output on the reference input holds NaN or infinity"}
    worst = min(psnr(a, b) for a, b in zip(got, reference, strict=True))
    largest = max((a - b).abs().max().item() for a, b in zip(got, reference, strict=True))
    return {"mode": mode, "passed": worst >= min_psnr_db,
            "psnr_db": round(worst, 2) if math.isfinite(worst) else "identical",
            "max_abs_diff_255": round(largest * 255, 2), "tolerance_db": min_psnr_db}


def accelerate(model, device: torch.device, *, precision: str = "auto", compile: str = "auto",
               min_psnr_db: float = 45.0, max_batch: int = 1) -> Acceleration:
    """Choose and check the cheaper modes for `model` (an hndsr HNDSR on `device`, float32, contiguous);
    leaves the model in the chosen layout (and with its UNet compiled if that was kept)."""
    lr = reference_input(model.data.channels).to(device)
    scales = sorted({model.min_scale, model.max_scale})

    def outputs(acceleration: Acceleration, batch: int = 1) -> list[torch.Tensor]:
        with torch.inference_mode(), acceleration.autocast(device):
            return [model.super_resolve(lr.expand(batch, -1, -1, -1), scale, seed=list(range(batch)))[:1]
                    .float().cpu() for scale in scales]

    start = time.perf_counter()
    reference = outputs(Acceleration())
    float32_ms = (time.perf_counter() - start) * 1000
    chosen = Acceleration()

    def check(mode: str, trial: Acceleration, warm_batch: int = 1) -> bool:
        started = time.perf_counter()
        try:
            got = outputs(trial)
            if warm_batch > 1:
                outputs(trial, warm_batch)
        except Exception as exc:  # e.g. no C++ compiler for torch.compile: this mode stays off
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            chosen.checks.append({"mode": mode, "passed": False, "detail": f"failed to run: {reason}"})
            log.warning("%s: off (failed to run on the reference input: %s)", mode, reason)
            return False
        elapsed_ms = (time.perf_counter() - started) * 1000
        record = verdict(mode, got, reference, min_psnr_db)
        record.update(scales=scales, check_ms=round(elapsed_ms, 1), float32_ms=round(float32_ms, 1))
        chosen.checks.append(record)
        at = " and x".join(f"{s:g}" for s in scales)
        if "psnr_db" not in record:
            log.warning("%s: off (%s at x%s)", mode, record["detail"], at)
        else:
            log.info("%s: %s; PSNR against float32 %s dB (tolerance %g dB) on the reference input at x%s", mode,
                     "on" if record["passed"] else "off (outside the tolerance)", record["psnr_db"], min_psnr_db, at)
        return record["passed"]

    if precision == "auto":
        supported, why_not = bfloat16_supported(device)
        if supported:
            _layout(model, torch.channels_last)
            if check("bfloat16", Acceleration("bfloat16")):
                chosen.precision = "bfloat16"
            else:
                _layout(model, torch.contiguous_format)
        else:
            chosen.checks.append({"mode": "bfloat16", "passed": False, "detail": why_not})
            log.info("bfloat16: off (%s)", why_not)
    if compile == "on" or (compile == "auto" and device.type == "cuda"):
        eager = model.unet
        if eager is None:
            chosen.checks.append({"mode": "compile", "passed": False, "detail": "the model has no diffusion UNet"})
        else:
            try:
                model.unet = torch.compile(eager, dynamic=True)  # compiles lazily, on the check's first call
            except Exception as exc:
                chosen.checks.append({"mode": "compile", "passed": False, "detail": f"torch.compile failed: {exc}"})
                log.warning("compile: off (torch.compile failed: %s)", exc)
            else:
                if check("compile", Acceleration(chosen.precision, True), max_batch):
                    chosen.compiled = True
                else:
                    model.unet = eager
    return chosen


def _layout(model, memory_format: torch.memory_format) -> None:
    """Put every 4-D weight (the convolutions) of the model in `memory_format`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            module.to(memory_format=memory_format)


# Defaults measured with benchmarks/tile_budget.py on the 2-core AVX-512 CPU machine (bfloat16, x4, 4 steps, freed
# memory kept): a 512 px input took 7.8 s in 9 passes of 0.6 MP, 9.2 s in 5 of 1.1 MP, 10.2 s in 3 of 2.2 MP and
# 11.1 s whole (4.2 MP): smaller passes stay in the caches, which outweighs the overlaps they add. (A 256 px
# input, 1.05 MP, is 3 passes at 0.6 MP: 2.06 s, against 1.8-1.9 s whole.) Batching tiles of several requests in
# one pass was no faster (8 x 128 px: 3.5 s one per pass, 3.6 / 3.8 / 4.4 s with 2 / 4 / 8); two passes in flight
# fill each other's serial gaps (8 x 128 px: 2.39 requests/s with one worker, 2.60 with two, 2.50 with three).
CPU_PASS_MEGAPIXELS = 0.6
CPU_MAX_BATCH = 1
CPU_WORKERS = 2
CUDA_MAX_BATCH = 8
CUDA_WORKERS = 1


def default_max_batch(setting: int | str, device: torch.device) -> int:
    if setting != "auto":
        return int(setting)
    return CUDA_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH


def default_workers(setting: int | str, device: torch.device) -> int:
    if setting != "auto":
        return int(setting)
    return CUDA_WORKERS if device.type == "cuda" else CPU_WORKERS


def pass_megapixels(setting: float | str, model, device: torch.device, acceleration: Acceleration) -> float:
    """The pass budget: the setting, or for `auto` the CPU default or, on CUDA, half the free device memory
    divided by the memory one output megapixel took in a probe pass (the reference input at the largest scale)."""
    if setting != "auto":
        return float(setting)
    if device.type != "cuda":
        return CPU_PASS_MEGAPIXELS
    lr = reference_input(model.data.channels).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), acceleration.autocast(device):
        out = model.super_resolve(lr, model.max_scale, seed=0)
    torch.cuda.synchronize(device)
    bytes_per_megapixel = (torch.cuda.max_memory_allocated(device) - before) / (out.shape[-2] * out.shape[-1] / 1e6)
    free, _ = torch.cuda.mem_get_info(device)
    budget = max(0.25, 0.5 * free / bytes_per_megapixel)
    log.info("pass budget %.1f MP: %.0f MB per output megapixel measured, %.1f GB free", budget,
             bytes_per_megapixel / 1e6, free / 1e9)
    return budget


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory in the process for reuse (Linux only).

    By default glibc serves every allocation above 128 KB (adapting up to 32 MB) with a fresh mmap and trims
    freed memory back to the OS, so each forward pass page-faults its activations in again; on the CPU that cost
    a fifth of the time of a 128x128 x4 request (0.59 -> 0.48 s median, bfloat16, default steps: a one-off
    comparison of processes with and without this call, alternated, on the 2-core development machine). Raising the mmap and trim thresholds keeps the pages mapped; the resident size then stays at its peak
    (about the largest pass) instead of dropping between requests. Returns whether it was applied.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    applied = all(mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 * 1024 * 1024), (m_trim_threshold, 1024 * 1024 * 1024), (m_top_pad, 64 * 1024 * 1024)))
    log.info("allocator: freed memory kept for reuse (glibc mmap threshold 32 MB)" if applied else
             "allocator: glibc refused the tuning; running with its defaults")
    return applied
