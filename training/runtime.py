"""Where and how training and evaluation run: device, precision, threads, determinism."""

from __future__ import annotations

import torch

from hndsr.params import TrainCommon


def setup_runtime(common: TrainCommon) -> tuple[torch.device, bool]:
    """Device and mixed precision: CUDA when present (or asked), with bfloat16 autocast where the GPU has
    bfloat16 arithmetic (Ampere and newer; older GPUs train in float32), else the CPU in float32 with
    deterministic algorithms, so CPU runs repeat exactly."""
    if common.threads:
        torch.set_num_threads(common.threads)
    if common.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available; use auto or cpu")
    use_cuda = common.device == "cuda" or (common.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda"), torch.cuda.is_bf16_supported()
    torch.use_deterministic_algorithms(True)
    return torch.device("cpu"), False
