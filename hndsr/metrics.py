"""Image-quality metrics on (B, 3, H, W) tensors in [0, 1], one value per image.

* PSNR: on RGB, data range 1, over the whole image (no border shaved).
* SSIM: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per channel, averaged.
* Detail ratio: high-frequency energy of an image relative to the HR's, where high frequency is the image
  minus its Gaussian blur (sigma 1 px). Bicubic and regression outputs are too smooth (ratio well below 1);
  a refinement that restores texture moves it toward 1; above 1 means invented noise.
* MS-SSIM: Wang, Simoncelli & Bovik 2003; SSIM's contrast-structure term at successively halved resolutions
  (2x2 average pooling) and the full SSIM at the coarsest, combined with the paper's weights (0.0448, 0.2856,
  0.3001, 0.2363, 0.1333). A 120 px tile holds 4 of the 5 scales (the coarsest must be >= the 11 px window), so
  the first 4 weights are used, renormalised. Judges structure across the scales at which aerial objects
  (parcels, buildings, roads) appear, not pixel by pixel. 1 is identical; higher is better.
* GMSD: gradient magnitude similarity deviation (Xue, Zhang, Mou & Bovik 2014): per band, both images 2x2
  averaged and subsampled, Prewitt gradient magnitudes g, the similarity map (2 g_o g_h + T) / (g_o^2 + g_h^2 + T)
  with T = 170/255^2, and its standard deviation over the pixels. Edges are what aerial imagery is read by (field
  boundaries, roads, roof outlines): GMSD is 0 for identical edges and grows where edges are blurred, shifted or
  invented; it tracks human judgement of distortions better than PSNR and SSIM on the LIVE, CSIQ and TID2013
  databases (the paper) and needs no learned weights. Lower is better.
* HF share (no reference): the share of an image's spectral power above half the Nyquist frequency (radial
  frequency > 0.25 cycles per pixel; per band, mean removed, Hann window, averaged over bands). How much fine
  detail an image holds, whatever the HR: bicubic and regression outputs hold little; noise holds much. Reported
  beside the HR's own share (`hr_hf_share`), which is what a faithful output approaches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mse = (output.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_kernel(sigma: float, radius: int, channels: int, device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, 2 * radius + 1, 2 * radius + 1).contiguous()


def _blur(x: torch.Tensor, sigma: float, radius: int, padding: str = "valid") -> torch.Tensor:
    kernel = _gaussian_kernel(sigma, radius, x.shape[1], x.device)
    if padding == "reflect":
        x = F.pad(x, (radius,) * 4, mode="reflect")
    return F.conv2d(x, kernel, groups=x.shape[1])


def ssim(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _ssim_terms(output.float(), target.float())[0]


def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    detail = x.float() - _blur(x.float(), 1.0, 3, padding="reflect")
    return detail.pow(2).flatten(1).mean(1)


def detail_ratio(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """High-frequency energy of `output` over that of `target`, per image."""
    return high_frequency_energy(output) / high_frequency_energy(target).clamp_min(1e-12)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11  # the Gaussian window's support: 2 * radius + 1


def _ssim_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM, contrast-structure) per image, each the mean of its map over pixels and channels."""
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = _blur(x, 1.5, 5), _blur(y, 1.5, 5)
    var_x = _blur(x * x, 1.5, 5) - mu_x**2
    var_y = _blur(y * y, 1.5, 5) - mu_y**2
    cov = _blur(x * y, 1.5, 5) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    return ssim_map.flatten(1).mean(1), cs_map.flatten(1).mean(1)


def ms_ssim_levels(height: int, width: int) -> int:
    """How many of MS-SSIM's 5 scales an image of this size holds (the coarsest at least the window)."""
    levels = 1
    while levels < len(MS_SSIM_WEIGHTS) and min(height, width) // 2**levels >= SSIM_WINDOW:
        levels += 1
    return levels


def ms_ssim(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x, y = output.float(), target.float()
    levels = ms_ssim_levels(x.shape[-2], x.shape[-1])
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels], device=x.device)
    weights = weights / weights.sum()
    terms = []
    for level in range(levels):
        ssim_value, cs = _ssim_terms(x, y)
        if level == levels - 1:
            terms.append(ssim_value)
        else:
            terms.append(cs)
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(terms, dim=1).clamp_min(0)  # negative terms (anti-correlated structure) count as 0
    return torch.prod(stacked ** weights, dim=1)


GMSD_T = 170 / 255**2


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    prewitt = torch.tensor([[1.0, 0.0, -1.0]] * 3, device=x.device) / 3
    kernels = torch.stack([prewitt, prewitt.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    channels = x.shape[1]
    grads = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), kernels)  # valid: no border invented
    return grads.pow(2).sum(1).sqrt().reshape(x.shape[0], channels, *grads.shape[-2:])


def gmsd(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = F.avg_pool2d(output.float(), 2)
    y = F.avg_pool2d(target.float(), 2)
    gx, gy = _gradient_magnitude(x), _gradient_magnitude(y)
    similarity = (2 * gx * gy + GMSD_T) / (gx**2 + gy**2 + GMSD_T)
    return similarity.flatten(2).std(dim=2, unbiased=False).mean(1)


def hf_share(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Share of spectral power above `cutoff` cycles per pixel (of the 0.5 Nyquist), per image; no reference."""
    x = x.float()
    height, width = x.shape[-2:]
    window = torch.hann_window(height, periodic=False, device=x.device)[:, None] * \
        torch.hann_window(width, periodic=False, device=x.device)[None, :]
    centred = (x - x.mean(dim=(-2, -1), keepdim=True)) * window
    power = torch.fft.rfft2(centred).abs().pow(2)
    fy = torch.fft.fftfreq(height, device=x.device)[:, None]
    fx = torch.fft.rfftfreq(width, device=x.device)[None, :]
    radius = torch.sqrt(fy**2 + fx**2)
    # rfft2 holds the non-negative x frequencies once; the ones with a mirror count twice
    twice = torch.ones_like(fx).expand_as(radius).clone()
    twice[:, 1 : (width + 1) // 2] = 2.0
    weighted = power * twice
    total = weighted[..., radius > 0].sum(-1)
    high = weighted[..., radius > cutoff].sum(-1)
    return (high / total.clamp_min(1e-20)).mean(1)
