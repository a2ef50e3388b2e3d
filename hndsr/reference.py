"""The reference input: a fixed, real 64x64 LR image (a crop of NASA Blue Marble, Nile valley) that every check
on a model's outputs runs on: the promotion gate (range, latency, registered copy) and the server's start-up
checks of reduced precision and compiled graphs (serving/acceleration.py)."""

from __future__ import annotations

from pathlib import Path

import torch

REFERENCE_IMAGE = Path(__file__).with_name("reference_lr.png")


def reference_input() -> torch.Tensor:
    """The reference image as a (1, 3, 64, 64) float tensor in [0, 1]."""
    from hndsr.images import decode_rgb, to_tensor

    return to_tensor(decode_rgb(REFERENCE_IMAGE.read_bytes(), max_pixels=64 * 64))
