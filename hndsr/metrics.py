"""Image-quality metrics on (B, 3, H, W) tensors in [0, 1], one value per image.

* PSNR: on RGB, data range 1, over the whole image (no border shaved).
* SSIM: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per channel, averaged.
* Detail ratio: high-frequency energy of an image relative to the HR's, where high frequency is the image
  minus its Gaussian blur (sigma 1 px). Bicubic and regression outputs are too smooth (ratio well below 1);
  a refinement that restores texture moves it toward 1; above 1 means invented noise.
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
    x, y = output.float(), target.float()
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = _blur(x, 1.5, 5), _blur(y, 1.5, 5)
    var_x = _blur(x * x, 1.5, 5) - mu_x**2
    var_y = _blur(y * y, 1.5, 5) - mu_y**2
    cov = _blur(x * y, 1.5, 5) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    detail = x.float() - _blur(x.float(), 1.0, 3, padding="reflect")
    return detail.pow(2).flatten(1).mean(1)


def detail_ratio(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """High-frequency energy of `output` over that of `target`, per image."""
    return high_frequency_energy(output) / high_frequency_energy(target).clamp_min(1e-12)
