"""Training batches from the ETL's HR tiles (read by `hndsr.splits`).

Training draws random HR crops with random flips/rotations and a random *continuous* scale per batch, and
makes the LR with the same `hndsr.degradation.degrade` the ETL used, quantised to the steps of each tile's stored
data type (8-bit: 256 levels, like the stored and served images; 16-bit: its levels through the radiometry; float:
none). Validation and test use the stored HR/LR pairs at the dataset's scales.
"""

from __future__ import annotations

import random

import torch

from hndsr.degradation import degrade, lr_size
from hndsr.model import apply_transform
from hndsr.splits import DataError, TileSet


class CropSampler:
    """Random training batches: HR crops (augmented) and their LR at one random scale per batch.

    Under torchrun every rank draws the same global batch of `batch_size` from the same seed and keeps its own
    rows `part` = [start, stop) (training.distributed.shard): the ranks together train on exactly the batches one
    process would, each computing a share."""

    def __init__(self, hr_tiles: TileSet, *, crop: int, batch_size: int, scale_range: tuple[float, float],
                 seed: int, part: tuple[int, int] | None = None) -> None:
        if crop > hr_tiles.pixels.shape[-1] or crop > hr_tiles.pixels.shape[-2]:
            raise DataError(f"crop {crop} is larger than the {hr_tiles.pixels.shape[-1]} px tiles; lower the crop size")
        self.hr_tiles = hr_tiles
        self.crop, self.batch_size = crop, batch_size
        self.scale_range = scale_range
        self.rng = random.Random(seed)
        self.part = part or (0, batch_size)

    def hr_batch(self) -> torch.Tensor:
        """(B, C, crop, crop) float HR crops, randomly flipped and rotated."""
        return self._crops()[0]

    def _crops(self) -> tuple[torch.Tensor, list[int]]:
        n, _, height, width = self.hr_tiles.pixels.shape
        crops, chosen = [], []
        start, stop = self.part
        for row in range(self.batch_size):
            i = self.rng.randrange(n)
            y, x = self.rng.randrange(height - self.crop + 1), self.rng.randrange(width - self.crop + 1)
            flip, turns = self.rng.random() < 0.5, self.rng.randrange(4)
            if not start <= row < stop:  # another rank's row: drawn, so every rank's stream stays the same
                continue
            tile = self.hr_tiles.pixels[i, :, y : y + self.crop, x : x + self.crop]
            crops.append(apply_transform(tile, (flip, turns)))  # aerial imagery has no "up": 8 orientations
            chosen.append(i)
        return torch.stack(crops), chosen

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(lr, hr, scale): LR made by `degrade` at a random scale, quantised; scale = crop / LR size."""
        hr, chosen = self._crops()
        nominal = self.rng.uniform(*self.scale_range)
        lr = self.hr_tiles.levels.select(chosen).quantize(degrade(hr, nominal))
        return lr, hr, self.crop / lr_size(self.crop, nominal)
