"""The consistency figures of hndsr.consistency on real imagery: phase correlation finds known shifts, and an
output that is exactly the input's upscale-then-shrink round trip scores near zero."""

from __future__ import annotations

import numpy as np
import torch

from hndsr.consistency import Consistency, phase_shift
from hndsr.images import decode_rgb
from hndsr.raster import DataSpec


def gray_crop(realsat, size: int = 96) -> np.ndarray:
    image = decode_rgb(sorted(realsat.glob("*.png"))[0].read_bytes(), max_pixels=10**8)
    return image[:size, :size].mean(axis=2)


def test_phase_correlation_finds_whole_and_sub_pixel_shifts(realsat):
    base = gray_crop(realsat, 128)
    assert np.allclose(phase_shift(base, base), (0.0, 0.0), atol=1e-6)
    moved = np.roll(base, (3, -2), axis=(0, 1))
    dy, dx = phase_shift(base, moved)
    assert abs(dy - 3) < 0.1 and abs(dx + 2) < 0.1
    # Half a pixel: the mean of the image and its one-pixel shift (a linear-interpolation shift of 0.5 px).
    half = (base + np.roll(base, 1, axis=1)) / 2
    _, dx = phase_shift(base, half)
    assert 0.3 < dx < 0.7


def test_a_shifted_output_shows_in_the_figures_and_a_faithful_one_does_not(realsat):
    spec = DataSpec.fixed()
    image = decode_rgb(sorted(realsat.glob("*.png"))[1].read_bytes(), max_pixels=10**8)[:64, :64]
    lr = image.transpose(2, 0, 1)  # (C, h, w) stored uint8
    upscaled = torch.nn.functional.interpolate(torch.from_numpy(spec.to_model(lr))[None], scale_factor=2,
                                              mode="bicubic", align_corners=False)[0].clamp(0, 1)
    figures = {}
    for name, output in (("faithful", upscaled), ("shifted", torch.roll(upscaled, 4, dims=2))):
        consistency = Consistency(spec, "uint8", 3)
        consistency.add(output.permute(1, 2, 0).numpy(), lr, np.ones((64, 64), bool), 2.0)
        figures[name] = consistency.summary()
    assert figures["faithful"]["shift_px"]["max"] < 0.1 and max(figures["faithful"]["reflectance_rmse"]) < 6
    assert abs(figures["shifted"]["shift_px"]["dx"] - 2.0) < 0.2  # 4 output px = 2 LR px
    assert figures["shifted"]["reflectance_rmse"][0] > 2 * figures["faithful"]["reflectance_rmse"][0]


def test_an_output_clipped_to_the_model_range_never_scores_as_perfect(geotiff):
    """Reflectance x 10000 (488-2102) through a model that maps floats from 0..1: whatever the output is, it is
    compared with the input as stored, so one pinned at the range's top shows an error of the input's size."""
    import rasterio

    with rasterio.open(geotiff / "reflectance_4band_float64.tif") as src:
        lr = src.read([1, 2, 3])[:, :64, :64]
    spec = DataSpec.fixed()  # float: 0..1
    pinned = np.ones((128, 128, 3), dtype=np.float32)  # what clipping 488..2102 to 0..1 gives
    consistency = Consistency(spec, "float64", 3)
    consistency.add(pinned, lr, np.ones((64, 64), bool), 2.0)
    figures = consistency.summary()
    assert min(figures["reflectance_rmse"]) > 400, figures  # stored units: the values are 488..2102
    assert figures["reflectance_nrmse"] > 400
