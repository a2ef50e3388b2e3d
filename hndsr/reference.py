"""The reference input: a fixed, real 64x64 LR image (a crop of NASA Blue Marble, Nile valley) that every check
on a model's outputs runs on: the promotion gate (range, latency, registered copy) and the server's start-up
checks of reduced precision and compiled graphs (inference/acceleration.py)."""

from __future__ import annotations

from pathlib import Path

import torch

REFERENCE_IMAGE = Path(__file__).with_name("reference_lr.png")


def reference_input(channels: int = 3) -> torch.Tensor:
    """The reference image as a (1, channels, 64, 64) float tensor in [0, 1]. A model of other than 3 bands gets
    the red, green and blue planes repeated in turn (R, G, B, R, ...): the checks compare a model with itself
    (float32 against cheaper arithmetic, checkpoints against the registered copy) or bound its range and time,
    for which any real image with that many channels serves."""
    from hndsr.images import decode_rgb, to_tensor

    rgb = to_tensor(decode_rgb(REFERENCE_IMAGE.read_bytes(), max_pixels=64 * 64))
    return rgb if channels == 3 else rgb[:, [i % 3 for i in range(channels)]]
