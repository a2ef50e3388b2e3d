"""PSNR and SSIM decide promotions, so they are checked against an established implementation (scikit-image)
on real images, distorted the ways the pipeline's outputs differ from the truth; MS-SSIM, GMSD and the HF share
(the perceptual figures) against float64 NumPy/SciPy references written from their papers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hndsr.degradation import degrade
from hndsr.images import decode_rgb, to_tensor
from hndsr.metrics import MS_SSIM_WEIGHTS, gmsd, hf_share, ms_ssim, ms_ssim_levels, psnr, ssim
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


# -- the perceptual figures (issue 28): each against a float64 NumPy/SciPy reference written from its paper, and
#    ordered the way the distortions are

def _reference_ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(SSIM, contrast-structure) of two (H, W, C) float64 images: scipy's Gaussian (sigma 1.5, radius 5), the
    border where the window does not fit cut off, as in Wang et al.'s 'valid' filtering."""
    from scipy.ndimage import gaussian_filter

    def blur(a):
        out = np.stack([gaussian_filter(a[..., c], 1.5, truncate=5 / 1.5, mode="constant") for c in range(a.shape[-1])], -1)
        return out[5:-5, 5:-5]

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    return float(((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs).mean()), float(cs.mean())


def _reference_ms_ssim(x: np.ndarray, y: np.ndarray, levels: int) -> float:
    weights = np.array(MS_SSIM_WEIGHTS[:levels]) / sum(MS_SSIM_WEIGHTS[:levels])
    value = 1.0
    for level in range(levels):
        s, cs = _reference_ssim_terms(x, y)
        value *= max(s if level == levels - 1 else cs, 0) ** weights[level]
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        x = x[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean((1, 3))
        y = y[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean((1, 3))
    return value


def _reference_gmsd(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.signal import correlate2d

    prewitt = np.array([[1.0, 0.0, -1.0]] * 3) / 3
    deviations = []
    for c in range(x.shape[-1]):
        maps = []
        for image in (x[..., c], y[..., c]):
            h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            small = image[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
            maps.append(np.hypot(correlate2d(small, prewitt, "valid"), correlate2d(small, prewitt.T, "valid")))
        t = 170 / 255**2
        similarity = (2 * maps[0] * maps[1] + t) / (maps[0] ** 2 + maps[1] ** 2 + t)
        deviations.append(similarity.std())
    return float(np.mean(deviations))


def _reference_hf_share(x: np.ndarray, cutoff: float = 0.25) -> float:
    h, w = x.shape[:2]
    window = np.outer(np.hanning(h), np.hanning(w))
    shares = []
    for c in range(x.shape[-1]):
        power = np.abs(np.fft.fft2((x[..., c] - x[..., c].mean()) * window)) ** 2  # the full plane, no symmetry
        radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
        shares.append(power[radius > cutoff].sum() / power[radius > 0].sum())
    return float(np.mean(shares))


@pytest.mark.parametrize("distortion", sorted(DISTORTIONS))
@pytest.mark.parametrize("name", IMAGES)
def test_perceptual_figures_agree_with_their_references(realsat, name, distortion):
    hr = _crop(realsat, name)
    output = DISTORTIONS[distortion](hr)
    assert ms_ssim_levels(120, 120) == 4  # 120, 60, 30, 15 px: the fifth (7 px) is smaller than the window
    assert ms_ssim(output, hr).item() == pytest.approx(_reference_ms_ssim(_numpy(output), _numpy(hr), 4), abs=1e-4)
    assert gmsd(output, hr).item() == pytest.approx(_reference_gmsd(_numpy(output), _numpy(hr)), abs=1e-4)
    assert hf_share(output).item() == pytest.approx(_reference_hf_share(_numpy(output)), abs=1e-4)
    assert gmsd(output, hr).item() > 0.002 and ms_ssim(output, hr).item() < 0.999  # a real difference


@pytest.mark.parametrize("name", IMAGES)
def test_perceptual_figures_order_the_distortions(realsat, name):
    hr = _crop(realsat, name)
    x2, x3 = DISTORTIONS["bicubic x2"](hr), DISTORTIONS["bicubic x3"](hr)
    assert ms_ssim(hr, hr).item() == pytest.approx(1.0, abs=1e-6) and gmsd(hr, hr).item() == pytest.approx(0, abs=1e-7)
    assert ms_ssim(x3, hr) < ms_ssim(x2, hr) < 1  # more blur, less structure
    assert gmsd(x3, hr) > gmsd(x2, hr) > 0  # more blur, edges further off
    assert hf_share(x3) < hf_share(x2) < hf_share(hr)  # more blur, less fine detail, with no reference
    noisy = DISTORTIONS["noise"](hr)
    assert hf_share(noisy) > hf_share(hr)  # invented detail raises it: why the HR's share is reported beside


def test_hf_share_of_white_noise_is_the_area_outside_the_cutoff():
    noise = torch.rand(4, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    area = 1 - np.pi * 0.25**2  # the frequency square [-0.5, 0.5]^2 outside the disc of radius 0.25
    assert hf_share(noise).mean().item() == pytest.approx(area, abs=0.03)
