"""PSNR and SSIM decide promotions, so they are checked against an established implementation (scikit-image)
on real images, distorted the ways the pipeline's outputs differ from the truth."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hndsr.degradation import degrade
from hndsr.images import decode_rgb, to_tensor
from hndsr.metrics import psnr, ssim
from hndsr.model import bicubic_upsample

IMAGES = ["landsat8_grenada.png", "naip_northdakota_2020.png", "oam_kampala_309606_261636_19.png",
          "spacenet6_rotterdam_urban.png", "korea_snowy_mountain_road.png"]


def _crop(realsat, name: str, size: int = 120) -> torch.Tensor:
    rgb = decode_rgb((realsat / name).read_bytes(), max_pixels=50_000_000)
    y, x = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
    return to_tensor(rgb[y : y + size, x : x + size])  # (1, 3, size, size) in [0, 1]


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    buffer = io.BytesIO()
    pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return to_tensor(np.asarray(Image.open(buffer).convert("RGB")))


DISTORTIONS = {
    "bicubic x3": lambda hr: bicubic_upsample(degrade(hr, 3.0), hr.shape[-2:]).clamp(0, 1),
    "bicubic x2": lambda hr: bicubic_upsample(degrade(hr, 2.0), hr.shape[-2:]).clamp(0, 1),
    "jpeg q30": lambda hr: _jpeg(hr, 30),
    "noise": lambda hr: (hr + 0.03 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1),
}


def _numpy(image: torch.Tensor) -> np.ndarray:
    return image[0].permute(1, 2, 0).double().numpy()  # (H, W, 3) float64


@pytest.mark.parametrize("distortion", sorted(DISTORTIONS))
@pytest.mark.parametrize("name", IMAGES)
def test_psnr_and_ssim_agree_with_scikit_image(realsat, name, distortion):
    hr = _crop(realsat, name)
    output = DISTORTIONS[distortion](hr)
    reference_psnr = peak_signal_noise_ratio(_numpy(hr), _numpy(output), data_range=1.0)
    # Wang et al.'s SSIM as ours: 11x11 Gaussian window (sigma 1.5), population covariance, mean over channels.
    reference_ssim = structural_similarity(_numpy(hr), _numpy(output), data_range=1.0, channel_axis=-1,
                                           gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert psnr(output, hr).item() == pytest.approx(reference_psnr, abs=1e-4)
    assert ssim(output, hr).item() == pytest.approx(reference_ssim, abs=1e-4)
    assert 0.2 < reference_ssim < 1.0  # a real difference, not two equal images


def test_metrics_are_per_image_in_a_batch(realsat):
    hr = torch.cat([_crop(realsat, name) for name in IMAGES[:3]])
    output = DISTORTIONS["bicubic x3"](hr)
    for i in range(len(hr)):
        assert psnr(output, hr)[i].item() == pytest.approx(psnr(output[i : i + 1], hr[i : i + 1]).item(), abs=1e-5)
        assert ssim(output, hr)[i].item() == pytest.approx(ssim(output[i : i + 1], hr[i : i + 1]).item(), abs=1e-6)
