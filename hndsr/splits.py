"""Reading the ETL's Parquet splits (the contract in DESIGN.md): stored HR tiles and HR/LR pairs, and the
dataset hash from the manifest. Training samples from them; evaluation and the promotion gate score on them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hndsr.errors import UserError


class DataError(UserError, RuntimeError):
    """The processed dataset is missing or unusable; the message says what to run."""


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def _read(data_dir: Path, split: str, columns: list[str]) -> list[dict]:
    import pyarrow.parquet as pq  # the training stack's; serving never reads splits

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
    """uint8 images -> float in [0, 1]."""
    return images.float() / 255.0
