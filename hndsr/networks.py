"""The three HNDSR networks: autoencoder, Fourier neural operator, and the diffusion UNet.

All three work on the latent grid of the autoencoder: `LATENT_FACTOR` = 2, so a 120x120 HR tile is a
60x60 latent. The latent is deliberately mild (8 channels for 2x2x3 = 12 pixel values): an earlier design
compressed so hard that reconstruction alone capped quality below bicubic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LATENT_FACTOR = 2  # HR pixels per latent cell along each axis


# ---------------------------------------------------------------------------------------------- autoencoder
@dataclass(frozen=True)
class AutoencoderConfig:
    channels: int = 3  # image bands (the checkpoint's data spec names them)
    latent_channels: int = 8  # channels of the latent (half the image's height and width)
    width: int = 32  # channels of the convolutions
    blocks: int = 1  # residual blocks in each side's convolutional branch


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels) if emb_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        if self.emb is not None:
            h = h + self.emb(emb)[:, :, None, None]  # timestep conditioning, (B, C, 1, 1)
        return x + self.conv2(h)


class Autoencoder(nn.Module):
    """Pixels (B, C, H, W) in [0, 1] <-> latent (B, latent_channels, H/2, W/2). H and W must be even.

    Each side is a linear map of 2x2 pixel blocks (space-to-depth, 4C values for C bands -> latent_channels) plus a
    convolutional residual body. `fit_linear` sets the linear maps to the data's whitened principal
    components and the bodies start at zero, so training starts from a near-lossless code (8 of 12 components
    keep > 99.99 % of the variance of satellite imagery) whose channels have unit variance, the scale the
    diffusion noise schedule assumes.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        c, blocks = config.width, config.blocks
        pixels = config.channels * LATENT_FACTOR**2
        self.enc_linear = nn.Conv2d(pixels, config.latent_channels, 1)
        self.enc_body = nn.Sequential(nn.Conv2d(pixels, c, 3, padding=1), *(ResBlock(c) for _ in range(blocks)),
                                      nn.Conv2d(c, config.latent_channels, 3, padding=1))
        self.dec_linear = nn.Conv2d(config.latent_channels, pixels, 1)
        self.dec_body = nn.Sequential(nn.Conv2d(config.latent_channels, c, 3, padding=1),
                                      *(ResBlock(c) for _ in range(blocks)), nn.Conv2d(c, pixels, 3, padding=1))
        for body in (self.enc_body, self.dec_body):
            nn.init.zeros_(body[-1].weight)
            nn.init.zeros_(body[-1].bias)

    @torch.no_grad()
    def fit_linear(self, images: torch.Tensor) -> None:
        """Set the linear maps to the whitened top principal components of `images` (B, C, H, W) in [0, 1]."""
        values = self.config.channels * LATENT_FACTOR**2
        blocks = F.pixel_unshuffle(images.float() * 2 - 1, LATENT_FACTOR).permute(0, 2, 3, 1).reshape(-1, values)
        mean = blocks.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((blocks - mean).T))
        k = self.config.latent_channels
        components = eigenvectors.flip(1)[:, :k]  # (values, k), largest variance first
        std = eigenvalues.flip(0)[:k].clamp_min(1e-8).sqrt()  # (k,)
        encode = components.T / std[:, None]  # (k, values): whitened coordinates
        self.enc_linear.weight.copy_(encode[:, :, None, None])
        self.enc_linear.bias.copy_(-encode @ mean)
        self.dec_linear.weight.copy_((components * std[None, :])[:, :, None, None])
        self.dec_linear.bias.copy_(mean)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        blocks = F.pixel_unshuffle(x * 2 - 1, LATENT_FACTOR)  # (B, 4C, H/2, W/2)
        return self.enc_linear(blocks) + self.enc_body(blocks)  # (B, latent, H/2, W/2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        blocks = self.dec_linear(z) + self.dec_body(z)  # (B, 4C, H/2, W/2)
        return (F.pixel_shuffle(blocks, LATENT_FACTOR) + 1) / 2  # (B, C, H, W), not clamped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# ------------------------------------------------------------------------------------ Fourier neural operator
@dataclass(frozen=True)
class OperatorConfig:
    channels: int = 3  # image bands, as the autoencoder's
    latent_channels: int = 8  # as the autoencoder's
    width: int = 32  # channels of the Fourier layers
    modes: int = 12  # Fourier modes kept per axis
    layers: int = 4  # Fourier layers
    block: str = "conv"  # each layer's local branch: "conv" (one 3x3) or "attention" (SPAN's block, AttentionBlock)

    def __post_init__(self) -> None:
        if self.block not in LOCAL_BLOCKS:
            raise ValueError(f"operator block {self.block!r}: choose one of {', '.join(LOCAL_BLOCKS)}")


class AttentionBlock(nn.Module):
    """SPAN's block (Wan et al., "Swift Parameter-free Attention Network", NTIRE 2024 efficient SR winner): three
    3x3 convolutions with SiLU between them, and an attention map made from the block's own output with no
    parameters: sigmoid(out) - 0.5 (odd in `out`: zero where the convolutions' output is zero, its sign where it is
    not). Returns (out + x) * attention, which keeps the features the convolutions respond to strongly and damps
    the rest."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.convs[0](x))
        out = self.convs[2](F.silu(self.convs[1](out)))
        return (out + x) * (torch.sigmoid(out) - 0.5)


LOCAL_BLOCKS = {"conv": lambda c: nn.Conv2d(c, c, 3, padding=1), "attention": AttentionBlock}


class SpectralConv2d(nn.Module):
    """Fourier layer: FFT, multiply the lowest modes by learned complex weights, inverse FFT.

    Keeps `modes` frequencies on each side of zero along the rows (positive and negative) and the first
    `modes` along the columns (the real FFT stores only non-negative column frequencies). On an input
    smaller than 2 * modes rows or modes columns, only the frequencies that exist are used: min(modes, H // 2)
    and min(modes, W // 2 + 1). Because the weights act on frequencies, not pixels, the layer applies to any
    grid size, which is what makes the operator work at any output size and scale.
    """

    def __init__(self, in_channels: int, out_channels: int, modes: int) -> None:
        super().__init__()
        self.modes = modes
        scale = 1 / (in_channels * out_channels)
        self.weight_pos = nn.Parameter(scale * torch.randn(in_channels, out_channels, modes, modes, 2))
        self.weight_neg = nn.Parameter(scale * torch.randn(in_channels, out_channels, modes, modes, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        x_ft = torch.fft.rfft2(x.float(), norm="ortho")  # (B, Cin, H, W//2+1)
        m1, m2 = min(self.modes, height // 2), min(self.modes, width // 2 + 1)
        cin, cout = self.weight_pos.shape[:2]
        # One real batched matmul over all kept modes (M = 2 m1 m2): (a + ib)(c + id) = (ac - bd) + i(ad + bc) as
        # [a, b] @ [[c, d], [-d, c]]. The same product as a complex einsum per mode, at 0.85 of its time on a CPU.
        modes = torch.cat([x_ft[:, :, :m1, :m2], x_ft[:, :, height - m1 :, :m2]], dim=2)  # (B, Cin, 2 m1, m2)
        modes = torch.view_as_real(modes).permute(2, 3, 0, 4, 1).reshape(2 * m1 * m2, batch, 2 * cin)
        weight = torch.cat([self.weight_pos[:, :, :m1, :m2], self.weight_neg[:, :, :m1, :m2]], dim=2)
        real, imag = weight[..., 0].permute(2, 3, 0, 1), weight[..., 1].permute(2, 3, 0, 1)  # (2 m1, m2, Cin, Cout)
        weight = torch.cat([torch.cat([real, imag], -1), torch.cat([-imag, real], -1)], -2)
        with torch.autocast(x.device.type, enabled=False):  # float32 like the FFT around it, also under bf16 autocast
            product = torch.bmm(modes, weight.reshape(2 * m1 * m2, 2 * cin, 2 * cout).float())
        product = product.view(2 * m1, m2, batch, 2, cout)
        product = torch.complex(product[..., 0, :], product[..., 1, :]).permute(2, 3, 0, 1)  # (B, Cout, 2 m1, m2)
        out = torch.zeros(batch, cout, height, width // 2 + 1, dtype=x_ft.dtype, device=x.device)
        out[:, :, :m1, :m2] = product[:, :, :m1]
        out[:, :, height - m1 :, :m2] = product[:, :, m1:]
        return torch.fft.irfft2(out, s=(height, width), norm="ortho").to(x.dtype)


class NeuralOperator(nn.Module):
    """Maps an LR image and its scale to a latent residual on the output grid (the prior's correction).

    Input: the LR image resampled (bicubic) to the output size, space-to-depth to the latent grid, plus
    channels for the scale (log) and the grid coordinates. Each layer adds a spectral convolution (global,
    resolution-independent) and a local branch (detail, which a truncated spectrum cannot carry): a 3x3
    convolution, or SPAN's attention block (`block: attention`).
    The last projection starts at zero, so an untrained operator leaves the prior at the encoded bicubic.
    """

    def __init__(self, config: OperatorConfig) -> None:
        super().__init__()
        self.config = config
        c = config.width
        self.lift = nn.Conv2d(config.channels * LATENT_FACTOR**2 + 3, c, 1)
        self.spectral = nn.ModuleList(SpectralConv2d(c, c, config.modes) for _ in range(config.layers))
        self.local = nn.ModuleList(LOCAL_BLOCKS[config.block](c) for _ in range(config.layers))
        self.project = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, config.latent_channels, 1))
        nn.init.zeros_(self.project[-1].weight)
        nn.init.zeros_(self.project[-1].bias)

    def forward(self, upsampled: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """upsampled: (B, C, H, W) bicubic LR at the output size; scale: (B,). Returns (B, latent, H/2, W/2)."""
        x = F.pixel_unshuffle(upsampled * 2 - 1, LATENT_FACTOR)  # (B, 4C, H/2, W/2)
        batch, _, height, width = x.shape
        ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(batch, 2, height, width)
        log_scale = scale.to(x.dtype).log().view(batch, 1, 1, 1).expand(batch, 1, height, width)
        h = self.lift(torch.cat([x, grid, log_scale], dim=1))  # (B, width, H/2, W/2)
        for spectral, local in zip(self.spectral, self.local, strict=True):
            h = h + F.gelu(spectral(h) + local(h))
        return self.project(h)


# ----------------------------------------------------------------------------------------------- diffusion UNet
@dataclass(frozen=True)
class UNetConfig:
    latent_channels: int = 8  # as the autoencoder's
    width: int = 48  # channels of the UNet's first level
    emb_dim: int = 128  # size of the timestep embedding


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class DiffusionUNet(nn.Module):
    """Predicts the clean latent residual from a noisy one, conditioned spatially on the prior.

    Input: concat(noisy residual, prior) on the latent grid (B, 2 * latent, h, w), with h and w even. The
    timestep and the scale factor enter every block through one embedding (sum of both): how much detail is
    missing depends on the scale, so the network must know it. Two resolutions with a skip connection.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c, e = config.width, config.emb_dim
        self.emb = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.scale_emb = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.inp = nn.Conv2d(2 * config.latent_channels, c, 3, padding=1)
        self.down_block = ResBlock(c, e)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * c, e)
        self.mid2 = ResBlock(2 * c, e)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.up_block = ResBlock(c, e)
        self.merge = nn.Conv2d(2 * c, c, 1)
        self.out = nn.Conv2d(c, config.latent_channels, 3, padding=1)
        # Starts by predicting a zero residual, so an untrained UNet leaves the prior as it is.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, prior: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        """noisy, prior: (B, latent, h, w); timesteps: (B,) integers; scale: (B,) floats."""
        emb = self.emb(timestep_embedding(timesteps, self.config.emb_dim))  # (B, emb)
        # log(scale) * 100 spreads the supported range over the sinusoid's frequencies like timesteps do
        emb = emb + self.scale_emb(timestep_embedding(scale.log() * 100, self.config.emb_dim))
        h0 = self.down_block(self.inp(torch.cat([noisy, prior], dim=1)), emb)  # (B, c, h, w)
        h = self.mid2(self.mid1(self.down(h0), emb), emb)  # (B, 2c, h/2, w/2)
        h = self.merge(torch.cat([self.up(h), h0], dim=1))  # (B, c, h, w)
        return self.out(self.up_block(h, emb))
