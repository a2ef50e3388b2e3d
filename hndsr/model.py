"""The composed HNDSR model: autoencoder + neural operator (prior) + diffusion UNet refined with DDIM.

    upsampled = bicubic(lr -> output size)                       # (B, C, H, W)
    prior     = encode(upsampled) + operator(upsampled, scale)    # (B, latent, H/2, W/2)
    residual  = DDIM sample of the UNet, conditioned on prior     # steps = 0: residual = 0
    hr        = decode(prior + strength * residual)               # (B, C, H, W)

The output size follows `hndsr.degradation.hr_size`: round_half_up(lr_size * scale) per axis. Internally
the grid is padded (replicate) to a multiple of 4 (latent factor 2 x one UNet downsampling) and cropped back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hndsr.degradation import check_scale, hr_size
from hndsr.networks import LATENT_FACTOR, Autoencoder, DiffusionUNet, NeuralOperator
from hndsr.raster import DataSpec
from hndsr.scheduler import DDIMScheduler

PAD_MULTIPLE = 2 * LATENT_FACTOR


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings recorded with the diffusion checkpoint (chosen on validation by its stage)."""

    steps: int = 8
    eta: float = 0.0
    temperature: float = 1.0  # standard deviation of the starting noise; < 1 trades detail for fidelity
    strength: float = 1.0  # share of the sampled residual added to the prior; 0 = the prior alone


Transform = tuple[bool, int]  # (mirror left-right, then quarter turns counter-clockwise)
IDENTITY: Transform = (False, 0)
DIHEDRAL: tuple[Transform, ...] = tuple((flip, turns) for flip in (False, True) for turns in range(4))  # 8, identity first


def apply_transform(x: torch.Tensor, transform: Transform) -> torch.Tensor:
    """Mirror (last axis) then rotate the last two axes of `x`: (..., H, W) -> (..., H, W) or (..., W, H)."""
    flip, turns = transform
    return torch.rot90(x.flip(-1) if flip else x, turns, dims=(-2, -1))


def undo_transform(x: torch.Tensor, transform: Transform) -> torch.Tensor:
    """The inverse of `apply_transform`."""
    flip, turns = transform
    x = torch.rot90(x, -turns, dims=(-2, -1))
    return x.flip(-1) if flip else x


def bicubic_upsample(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bicubic baseline (and the operator's input): (B, C, h, w) -> (B, C, *size), clamped to [0, 1]."""
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def output_size(lr: torch.Tensor, scale: float) -> tuple[int, int]:
    return hr_size(lr.shape[-2], scale), hr_size(lr.shape[-1], scale)


def latent_prior(autoencoder: Autoencoder, operator: NeuralOperator, lr: torch.Tensor, scale: float,
                 size: tuple[int, int]) -> torch.Tensor:
    """The operator's structural prior on the padded output grid: encode(bicubic) + operator correction.

    lr: (B, C, h, w) in [0, 1]; size: output (H, W). Returns (B, latent, ceil4(H)/2, ceil4(W)/2).
    Used by the composed model and by training (with gradients), so both compute the same thing.
    """
    upsampled = _pad(bicubic_upsample(lr, size))
    scales = torch.full((lr.shape[0],), scale, device=lr.device)
    return autoencoder.encode(upsampled) + operator(upsampled, scales)


class HNDSR(nn.Module):
    def __init__(self, autoencoder: Autoencoder, operator: NeuralOperator, unet: DiffusionUNet | None,
                 scheduler: DDIMScheduler, *, min_scale: float, max_scale: float,
                 defaults: SamplingDefaults | None = None, data: DataSpec | None = None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.operator = operator
        self.unet = unet
        self.scheduler = scheduler
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.defaults = defaults or SamplingDefaults()
        self.data = data or DataSpec.fixed()  # bands and radiometry of the pixels it takes and returns

    def check_scale(self, scale: float) -> float:
        scale = check_scale(scale)
        if not self.min_scale - 1e-9 <= scale <= self.max_scale + 1e-9:
            raise ValueError(f"scale {scale} is outside the trained range [{self.min_scale}, {self.max_scale}]")
        return scale

    def prior(self, lr: torch.Tensor, scale: float, size: tuple[int, int]) -> torch.Tensor:
        """Latent prior on the padded output grid: (B, latent, ceil4(H)/2, ceil4(W)/2)."""
        return latent_prior(self.autoencoder, self.operator, lr, scale, size)

    def sample_residual(self, prior: torch.Tensor, scale: float, *, steps: int, eta: float, temperature: float,
                        seed: int | Sequence[int] | None,
                        callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """DDIM sampling of the latent residual, conditioned on `prior`; same seed, same result.

        `seed`: one int for the whole batch, or one per batch element; per-element seeds make each element's
        result independent of what else is in the batch (serving batches tiles of different requests).
        `callback(done, steps)` runs after every DDIM step (serving checks request deadlines there).
        """
        if self.unet is None:
            raise ValueError("this model has no diffusion UNet; use steps = 0")
        draw = _noise_source(prior.shape, seed, prior.dtype)
        sample = temperature * draw().to(prior.device)
        scales = torch.full((prior.shape[0],), scale, device=prior.device)
        timesteps_list = self.scheduler.set_timesteps(steps).tolist()
        for done, t in enumerate(timesteps_list, start=1):
            timesteps = torch.full((prior.shape[0],), t, device=prior.device, dtype=torch.long)
            out = self.unet(sample, timesteps, prior, scales)
            sample = self.scheduler.step(out, t, sample, eta=eta, noise=draw() if eta > 0 else None)
            if callback is not None:
                callback(done, len(timesteps_list))
        return sample

    @torch.no_grad()
    def super_resolve(self, lr: torch.Tensor, scale: float, *, steps: int | None = None,
                      seed: int | Sequence[int] | None = None, eta: float | None = None,
                      temperature: float | None = None, strength: float | None = None,
                      size: tuple[int, int] | None = None, clamp: bool = True,
                      callback: Callable[[int, int], None] | None = None,
                      ensemble: Sequence[Transform] | None = None) -> torch.Tensor:
        """HR image for `lr` (B, C, h, w) in [0, 1] at `scale`; `steps = 0` decodes the prior directly.

        Returns (B, C, H, W), with (H, W) = `size` or the size rule for `scale`, clamped to [0, 1] unless
        `clamp` is False (the promotion gate checks the raw decoder output). `seed` and `callback`: see
        `sample_residual`.

        `ensemble` (geometric self-ensemble): run on each transformed LR (`DIHEDRAL`: the 8 flips and quarter
        turns), transform each output back, and average them: the networks are not exactly equivariant (the
        operator sees grid coordinates, convolutions pad at the edges), so the average cancels part of their
        errors, at len(ensemble) times the cost. Every pass samples with the same `seed`; the callback counts
        all passes' steps.
        """
        scale = self.check_scale(scale)
        steps = self.defaults.steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        height, width = size or output_size(lr, scale)
        if ensemble is not None:
            transforms = list(ensemble)
            if not transforms or any(t not in DIHEDRAL for t in transforms):
                raise ValueError(f"ensemble must list transforms of hndsr.model.DIHEDRAL, got {ensemble!r}")
            passes = len(transforms)

            def each(done: int, total: int, first: int = 0) -> None:
                if callback is not None:
                    callback(first * total + done, passes * total)

            outputs = []
            for index, transform in enumerate(transforms):
                turned = transform[1] % 2 == 1  # a quarter turn swaps the output's height and width
                out = self.super_resolve(apply_transform(lr, transform), scale, steps=steps, seed=seed, eta=eta,
                                         temperature=temperature, strength=strength, clamp=clamp,
                                         size=(width, height) if turned else (height, width),
                                         callback=lambda d, t, i=index: each(d, t, i))
                outputs.append(undo_transform(out, transform))
            return torch.stack(outputs).mean(0) if passes > 1 else outputs[0]
        latent = self.prior(lr, scale, (height, width))
        if steps > 0:
            residual = self.sample_residual(
                latent, scale, steps=steps, seed=seed, callback=callback,
                eta=self.defaults.eta if eta is None else eta,
                temperature=self.defaults.temperature if temperature is None else temperature)
            latent = latent + (self.defaults.strength if strength is None else strength) * residual
        output = self.autoencoder.decode(latent)[..., :height, :width]
        return output.clamp(0.0, 1.0) if clamp else output


def _noise_source(shape: torch.Size, seed: int | Sequence[int] | None, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A function drawing standard normal noise of `shape` on the CPU: one generator for the batch (int or
    None seed, None = 0) or one per batch element (a sequence of seeds), so results do not depend on the device."""
    if seed is None or isinstance(seed, int):
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        return lambda: torch.randn(shape, generator=generator, dtype=dtype)
    seeds = [int(s) for s in seed]
    if len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda: torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generators])


def _pad(x: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % PAD_MULTIPLE, (-width) % PAD_MULTIPLE
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
