"""Training and evaluation data from the ETL's Parquet splits.

Training draws random HR crops with random flips/rotations and a random *continuous* scale per batch, and
makes the LR with the same `hndsr.degradation.degrade` the ETL used, quantised to 8 bits like the stored
(and served) images. Validation and test use the stored HR/LR pairs at the dataset's scales.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from hndsr.degradation import degrade, lr_size


class DataError(RuntimeError):
    """The processed dataset is missing or unusable; the message says what to run."""


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def _read(data_dir: Path, split: str, columns: list[str]) -> list[dict]:
    path = data_dir / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found: run the etl stage first (`dvc repro etl`)")
    return pq.read_table(path, columns=columns).to_pylist()


def dataset_hash(data_dir: str | Path) -> str:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run the etl stage first (`dvc repro etl`)")
    return json.loads(path.read_text())["dataset_hash"]


def load_hr_tiles(data_dir: str | Path, split: str) -> torch.Tensor:
    """Every distinct HR tile of a split, in file order: (N, 3, T, T) uint8."""
    seen, arrays = set(), []
    for row in _read(Path(data_dir), split, ["tile_id", "hr_png"]):
        if row["tile_id"] not in seen:
            seen.add(row["tile_id"])
            arrays.append(_png(row["hr_png"]))
    if not arrays:
        raise DataError(f"the {split} split of {data_dir} is empty: add data or change etl.splits")
    return _stack(arrays)


@dataclass
class PairSet:
    """Stored LR/HR pairs of one split at one scale, uint8 (N, 3, h, w) and (N, 3, H, W)."""

    scale: float
    lr: torch.Tensor
    hr: torch.Tensor
    tile_ids: list[str]


def _evenly_spaced(rows: list, limit: int | None) -> list:
    """`limit` rows spread over the whole list: files are in raster order, so the first N would all come
    from one region (the Arctic, for Blue Marble) and misrepresent the split."""
    if limit is None or limit >= len(rows):
        return rows
    return [rows[(i * len(rows)) // limit] for i in range(limit)]


def load_pairs(data_dir: str | Path, split: str, *, limit: int | None = None) -> dict[float, PairSet]:
    """The stored pairs of a split, by scale; `limit` keeps N tiles per scale, evenly spaced through it."""
    rows = _read(Path(data_dir), split, ["tile_id", "scale", "hr_png", "lr_png"])
    by_scale: dict[float, list[dict]] = {}
    for row in rows:
        by_scale.setdefault(row["scale"], []).append(row)
    pairs = {}
    for scale in sorted(by_scale):
        chosen = _evenly_spaced(by_scale[scale], limit)
        pairs[scale] = PairSet(scale, _stack([_png(r["lr_png"]) for r in chosen]),
                               _stack([_png(r["hr_png"]) for r in chosen]), [r["tile_id"] for r in chosen])
    if not pairs:
        raise DataError(f"the {split} split of {data_dir} is empty: add data or change etl.splits")
    return pairs


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit levels a stored or uploaded image has."""
    return images.clamp(0, 1).mul(255).round().div(255)


class CropSampler:
    """Random training batches: HR crops (augmented) and their LR at one random scale per batch."""

    def __init__(self, hr_tiles: torch.Tensor, *, crop: int, batch_size: int, scale_range: tuple[float, float],
                 seed: int) -> None:
        if crop > hr_tiles.shape[-1] or crop > hr_tiles.shape[-2]:
            raise DataError(f"crop {crop} is larger than the {hr_tiles.shape[-1]} px tiles; lower the crop size")
        self.hr_tiles = hr_tiles
        self.crop, self.batch_size = crop, batch_size
        self.scale_range = scale_range
        self.rng = random.Random(seed)

    def hr_batch(self) -> torch.Tensor:
        """(B, 3, crop, crop) float HR crops, randomly flipped and rotated."""
        n, _, height, width = self.hr_tiles.shape
        crops = []
        for _ in range(self.batch_size):
            i = self.rng.randrange(n)
            y, x = self.rng.randrange(height - self.crop + 1), self.rng.randrange(width - self.crop + 1)
            tile = self.hr_tiles[i, :, y : y + self.crop, x : x + self.crop]
            if self.rng.random() < 0.5:
                tile = tile.flip(-1)
            crops.append(torch.rot90(tile, self.rng.randrange(4), dims=(-2, -1)))
        return to_float(torch.stack(crops))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(lr, hr, scale): LR made by `degrade` at a random scale, quantised; scale = crop / LR size."""
        hr = self.hr_batch()
        nominal = self.rng.uniform(*self.scale_range)
        lr = quantize(degrade(hr, nominal))
        return lr, hr, self.crop / lr_size(self.crop, nominal)
