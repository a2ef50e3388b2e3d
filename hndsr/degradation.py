"""The one degradation function (HR -> LR) and the size rule that ties HR and LR together.

ETL, training (random continuous scales) and evaluation all call `degrade`, so the model is trained and
judged on exactly the LR images the dataset holds.

Size rule, for any real ``scale > 1`` (integer or not)::

    lr_size = round_half_up(hr_size / scale)      # used by degrade()
    hr_size = round_half_up(lr_size * scale)      # used when upscaling (serving, evaluation)

The two are inverse exactly when ``hr_size / scale`` is a whole number, e.g. a 120 px HR tile gives LR tiles
of 60, 48, 40 and 30 px at scales 2, 2.5, 3 and 4, and each maps back to 120. The ETL therefore requires its
tile size to be such a multiple of every scale (120 works for 2, 2.5, 3 and 4; 128 does not work for 2.5 or 3).
For other sizes the effective scale of a pair is ``hr_size / lr_size`` per axis, which differs slightly from
the nominal one.

Degradation: antialiased bicubic resampling (Keys cubic, a = -0.75, PyTorch's ``antialias=True`` widens the
kernel by the scale factor so the downscale low-pass filters instead of aliasing), output clamped to [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_ROUNDING_SLACK = 1e-9  # so 2.5 * 48 = 119.99999999 still rounds to 120


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5 + _ROUNDING_SLACK)


def check_scale(scale: float) -> float:
    """Return `scale` as a float, or raise ValueError when it is not a finite number above 1."""
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 1.0:
        raise ValueError(f"scale must be a finite number greater than 1, got {scale}")
    return scale


def lr_size(hr_size: int, scale: float) -> int:
    """LR edge length for an HR edge of `hr_size` pixels: round_half_up(hr_size / scale), at least 1."""
    return max(1, _round_half_up(hr_size / check_scale(scale)))


def hr_size(lr_size: int, scale: float) -> int:
    """HR (output) edge length for an LR edge of `lr_size` pixels: round_half_up(lr_size * scale)."""
    return _round_half_up(lr_size * check_scale(scale))


def is_exact(hr_size: int, scale: float) -> bool:
    """True when `hr_size / scale` is a whole number, so the size rule maps LR back to `hr_size` exactly."""
    lr = hr_size / check_scale(scale)
    return abs(lr - round(lr)) < 1e-6 and round(lr) >= 1


def degrade(hr: torch.Tensor, scale: float, *, clamp: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """Antialiased-bicubic LR version of `hr` at `scale`.

    hr: (B, C, H, W) float in [0, 1]. Returns (B, C, lr_size(H), lr_size(W)) float in [0, 1]. The ETL degrades
    16-bit and float tiles in stored units: `clamp` is then the data type's range (integers) or None (floats).
    """
    if hr.ndim != 4:
        raise ValueError(f"degrade expects a (B, C, H, W) tensor, got shape {tuple(hr.shape)}")
    height, width = hr.shape[-2:]
    size = (lr_size(height, scale), lr_size(width, scale))
    lr = F.interpolate(hr, size=size, mode="bicubic", antialias=True, align_corners=False)  # (B, C, h, w)
    return lr if clamp is None else lr.clamp_(*clamp)
