"""Params of the promotion gate (params.yaml section `promote`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hndsr.config import ConfigError
from hndsr.params import load_section


@dataclass(frozen=True)
class PromoteParams:
    model_name: str = "hndsr"  # the registered model
    alias: str = "production"  # the alias the gate moves
    # Beat bicubic PSNR on the test split by at least this many dB at every evaluated scale.
    min_gain_over_bicubic: float = 0.2
    # Against the current production version, on the same test split: at most this much lower, any scale.
    max_psnr_regression: float = 0.05  # dB
    max_ssim_regression: float = 0.002  # SSIM at most this much lower than production's, any scale
    # Raw decoder output on the reference input (before clamping): finite everywhere, and at most
    # max_out_of_range of its values more than range_margin outside [0, 1].
    range_margin: float = 0.05
    max_out_of_range: float = 0.001
    # Median latency of the reference input (hndsr/reference_lr.png, 64x64) at reference_scale with the
    # model's default DDIM steps, over latency_repeats runs after one warm-up; budget in milliseconds.
    reference_scale: float = 4.0
    latency_repeats: int = 3  # timed runs of the reference input (the median counts)
    latency_budget_ms: float = 5000.0
    seed: int = 0  # the seed of the reference run (same seed, same output)
    # The output shrunk back by the degradation function against its own LR, at every evaluated scale
    # (metrics/eval.json, hndsr.consistency): displacement by phase correlation, spectral angle, normalised RMSE.
    max_shift_px: float = 0.1  # LR pixels
    max_spectral_angle_deg: float = 2.0  # degrees, output shrunk back against its LR (hndsr.consistency)
    max_consistency_nrmse: float = 0.02  # share of the radiometric range

    def __post_init__(self) -> None:
        for key in ("min_gain_over_bicubic", "max_psnr_regression", "max_ssim_regression", "range_margin",
                    "max_out_of_range", "latency_budget_ms", "max_shift_px", "max_spectral_angle_deg",
                    "max_consistency_nrmse"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"promote.{key}: must be a finite number >= 0, got {value}")
        if self.latency_repeats < 1:
            raise ConfigError("promote.latency_repeats: must be at least 1")
        if not self.model_name or not self.alias:
            raise ConfigError("promote.model_name and promote.alias must not be empty")


def load_promote(path: str | Path) -> PromoteParams:
    return load_section(PromoteParams, path, "promote")
