"""DDIM scheduler (Song et al., 2021), shared by training (`add_noise`) and sampling (`set_timesteps`, `step`).

Noise schedule: cosine (Nichol & Dhariwal, 2021) over `num_train_timesteps`, betas clipped at 0.999.
Prediction target: by default the network predicts the clean sample x0 ("sample"); "epsilon" is supported too.

Timesteps for sampling are spaced "trailing": with T = 1000 and 10 steps they are 999, 899, ..., 99, so
sampling starts at the noisiest trained timestep (where the input really is pure noise) and each step goes
to the *next entry of that list*; after the last one the sample is x0 itself (alpha_bar = 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

PREDICTION_TYPES = ("sample", "epsilon")


@dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    prediction_type: str = "sample"


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 from the cosine schedule, via betas clipped at 0.999. float64, (T,)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / num_timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


class DDIMScheduler:
    def __init__(self, config: DDIMConfig | None = None) -> None:
        self.config = config or DDIMConfig()
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.config.prediction_type!r}")
        if self.config.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        self.alphas_cumprod = cosine_alphas_cumprod(self.config.num_train_timesteps)
        self.timesteps: torch.Tensor = torch.empty(0, dtype=torch.long)
        self._previous: dict[int, int] = {}

    def to_dict(self) -> dict:
        return asdict(self.config)

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Choose `num_inference_steps` trailing timesteps (descending) and return them."""
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be between 1 and {total}, got {num_inference_steps}")
        ratio = total / num_inference_steps
        steps = [round(total - i * ratio) - 1 for i in range(num_inference_steps)]
        self.timesteps = torch.tensor(steps, dtype=torch.long)
        self._previous = {t: (steps[i + 1] if i + 1 < len(steps) else -1) for i, t in enumerate(steps)}
        return self.timesteps

    def previous_timestep(self, timestep: int) -> int:
        """The timestep `step` moves to from `timestep` (-1 means the clean sample)."""
        if int(timestep) not in self._previous:
            raise ValueError(f"timestep {int(timestep)} is not in the current schedule; call set_timesteps first")
        return self._previous[int(timestep)]

    def _alpha_bar(self, timestep: int) -> float:
        return 1.0 if timestep < 0 else float(self.alphas_cumprod[timestep])

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q_sample: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, per batch element."""
        if timesteps.ndim != 1 or timesteps.shape[0] != original.shape[0]:
            raise ValueError("timesteps must be a 1-D tensor with one entry per batch element")
        alpha_bar = self.alphas_cumprod.to(original.device)[timesteps].to(original.dtype)
        shape = (-1,) + (1,) * (original.ndim - 1)
        return alpha_bar.sqrt().view(shape) * original + (1 - alpha_bar).sqrt().view(shape) * noise

    def predict_original(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """x0 implied by the network's output at `timestep`."""
        if self.config.prediction_type == "sample":
            return model_output
        alpha_bar = self._alpha_bar(int(timestep))
        return (sample - math.sqrt(1 - alpha_bar) * model_output) / math.sqrt(alpha_bar)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM update from x_t to x_prev (eq. 12 of the DDIM paper); deterministic when eta = 0.

        With eta > 0 the added noise is `noise` when given (shape of `sample`), else drawn from `generator`.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta > 1:
            warnings.warn(f"eta = {eta} > 1 adds more noise than DDPM sampling", stacklevel=2)
        t = int(timestep)
        prev = self.previous_timestep(t)
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(prev)
        x0 = self.predict_original(model_output, t, sample)
        eps = (sample - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        sigma = eta * math.sqrt(max(variance, 0.0))
        direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
        prev_sample = math.sqrt(alpha_bar_prev) * x0 + direction
        if sigma > 0:
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device="cpu")
            prev_sample = prev_sample + sigma * noise.to(device=sample.device, dtype=sample.dtype)
        return prev_sample
