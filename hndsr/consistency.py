"""Figures that show an output did not invent or shift anything, without high-resolution truth.

The output is shrunk back by the degradation function (hndsr.degradation) and compared with its input on valid
pixels: RMSE per band in stored units (and, as `reflectance_nrmse`, its mean over bands as a share of the radiometric
range mapped to [0, 1], comparable across data types), the mean spectral angle in degrees (two or more bands) between the
shrunk output and the input, and the displacement between the two by phase correlation (LR pixels, sub-pixel;
pixel-weighted mean over the pieces, and the largest). `hndsr predict` writes them per scene; the evaluate stage
reports them per scale on the test split (hndsr.evaluation) and the promotion gate bounds them.
"""

from __future__ import annotations

import numpy as np
import torch

from hndsr.degradation import degrade
from hndsr.raster import DataSpec


class Consistency:
    """Consistency of outputs with their inputs, accumulated over windows or tiles (see the module doc)."""

    BORDER = 2  # LR pixels at each window edge left out (the shrink's kernel reaches past the window there)

    def __init__(self, spec: DataSpec, dtype: str | None, bands: int) -> None:
        """`dtype`: the stored type of the inputs `add` gets; None: they are model values (RMSE in model units)."""
        self.spec, self.dtype, self.bands = spec, dtype, bands
        self.squared = np.zeros(bands)
        self.count = 0
        self.angle_sum = 0.0
        self.shifts: list[tuple[float, float, int]] = []

    def add(self, output: np.ndarray, lr_values: np.ndarray, valid: np.ndarray, scale: float) -> None:
        """`output`: (H, W, C) float model values; `lr_values`: (C, h, w) stored values of the input it came from;
        `valid`: (h, w) bool."""
        hr = torch.from_numpy(np.ascontiguousarray(output.transpose(2, 0, 1)))[None]
        shrunk = degrade(hr, scale)[0].numpy()  # (C, h', w') model units
        h, w = min(shrunk.shape[1], lr_values.shape[1]), min(shrunk.shape[2], lr_values.shape[2])
        b = self.BORDER if min(h, w) > 4 * self.BORDER else 0
        inner = (slice(b, h - b), slice(b, w - b))
        low, width = (v[:, None, None] for v in self._range())
        back = low + shrunk[:, inner[0], inner[1]].astype(np.float64) * width  # stored units
        # The input as stored, never clipped to the model's range: an output that lost what the model could not
        # represent shows it here (hndsr.raster.check_range refuses inputs far outside that range beforehand).
        given = lr_values[:, inner[0], inner[1]].astype(np.float64)
        ok = valid[inner]
        if not ok.any():
            return
        diff = (back - given)[:, ok]
        self.squared += (diff**2).sum(axis=1)
        self.count += int(ok.sum())
        if self.bands > 1:
            a, g = back[:, ok], given[:, ok]
            cos = (a * g).sum(0) / np.maximum(np.linalg.norm(a, axis=0) * np.linalg.norm(g, axis=0), 1e-12)
            self.angle_sum += float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).sum())
        if min(h, w) - 2 * b >= 16:
            dy, dx = phase_shift(np.where(ok, given.mean(0), given.mean(0)[ok].mean()),
                                 np.where(ok, back.mean(0), back.mean(0)[ok].mean()))
            self.shifts.append((dy, dx, int(ok.sum())))

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per band, the low and width of the stored range mapped to [0, 1]."""
        if self.dtype is None:
            return np.zeros(self.bands), np.ones(self.bands)
        band_range = self.spec.band_range(self.dtype)
        return np.asarray(band_range.low), np.asarray(band_range.high) - np.asarray(band_range.low)

    def summary(self) -> dict:
        if not self.count:
            return {"valid_lr_pixels": 0}
        rmse = np.sqrt(self.squared / self.count)
        width = self._range()[1]
        weights = np.array([n for _, _, n in self.shifts], dtype=np.float64)
        shifts = np.array([(dy, dx) for dy, dx, _ in self.shifts]) if self.shifts else np.zeros((0, 2))
        mean_shift = (shifts * weights[:, None]).sum(0) / weights.sum() if self.shifts else np.zeros(2)
        return {
            "valid_lr_pixels": self.count,
            "reflectance_rmse": [round(float(v), 6) for v in rmse],
            "reflectance_nrmse": round(float((rmse / width).mean()), 6),  # mean over bands, share of the mapped range
            "spectral_angle_deg": round(self.angle_sum / self.count, 4) if self.bands > 1 else None,
            "shift_px": {"dy": round(float(mean_shift[0]), 4), "dx": round(float(mean_shift[1]), 4),
                         "max": round(float(np.hypot(*shifts.T).max()), 4) if self.shifts else None},
        }


def phase_shift(reference: np.ndarray, moved: np.ndarray) -> tuple[float, float]:
    """(dy, dx) in pixels that `moved` is displaced from `reference`, by phase correlation with a parabolic
    sub-pixel peak (a Hann window against edge effects)."""
    window = np.outer(np.hanning(reference.shape[0]), np.hanning(reference.shape[1]))
    a = np.fft.fft2((reference - reference.mean()) * window)
    b = np.fft.fft2((moved - moved.mean()) * window)
    cross = b * np.conj(a)
    surface = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-12)).real
    peak = np.unravel_index(np.argmax(surface), surface.shape)
    shift = []
    for axis, size in enumerate(surface.shape):
        index = list(peak)
        values = []
        for step in (-1, 0, 1):
            index[axis] = (peak[axis] + step) % size
            values.append(surface[tuple(index)])
        denominator = values[0] - 2 * values[1] + values[2]
        offset = 0.5 * (values[0] - values[2]) / denominator if abs(denominator) > 1e-12 else 0.0
        position = peak[axis] + offset
        shift.append(position - size if position > size / 2 else position)
    return shift[0], shift[1]
