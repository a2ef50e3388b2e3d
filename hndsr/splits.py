"""Reading the ETL's Parquet splits (the contract in DESIGN.md): stored HR tiles and HR/LR pairs as model values
(the dataset's radiometry, from its manifest), and the dataset hash. Training samples from them; evaluation and
the promotion gate score on them.

A tile is stored as PNG when it is 8-bit RGB (as every tile was before bands and radiometry were recorded) and as
a TIFF (written and read by rasterio, deflate) otherwise: any band count, 8- or 16-bit integers or float32.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hndsr import raster
from hndsr.errors import UserError
from hndsr.images import encode_png
from hndsr.raster import DataSpec

PNG_MAGIC = b"\x89PNG"
# Stored tiles are not georeferenced on purpose (the manifest records each source's CRS and pixel size):
# hndsr.raster silences rasterio's warning for it process-wide whenever it uses rasterio (the ETL encodes on a
# thread pool, where catch_warnings() is not safe); 8-bit RGB tiles (PNG) never import it.


class DataError(UserError, RuntimeError):
    """The processed dataset is missing or unusable; the message says what to run."""


def encode_tile(pixels: np.ndarray) -> bytes:
    """(H, W, C) stored values -> PNG bytes for 8-bit RGB, else TIFF bytes (same data type and bands)."""
    if pixels.dtype == np.uint8 and pixels.shape[2] == 3:
        return encode_png(pixels)
    height, width, channels = pixels.shape
    return raster.encode_geotiff(np.ascontiguousarray(pixels.transpose(2, 0, 1)),
                                 raster.output_profile(pixels.dtype.name, channels, width, height))


def decode_tile(data: bytes) -> np.ndarray:
    """A stored tile's bytes -> (H, W, C) stored values."""
    if data[:4] == PNG_MAGIC:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    with raster.open_raster(data) as dataset:
        return np.ascontiguousarray(dataset.read().transpose(1, 2, 0))


def _read(data_dir: Path, split: str, columns: list[str]) -> list[dict]:
    import pyarrow.parquet as pq  # the training stack's; serving never reads splits

    path = data_dir / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found: run the etl stage first (`dvc repro etl`)")
    return pq.read_table(path, columns=columns).to_pylist()


def _manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run the etl stage first (`dvc repro etl`)")
    return json.loads(path.read_text())


def dataset_hash(data_dir: str | Path) -> str:
    return _manifest(data_dir)["dataset_hash"]


def data_spec(data_dir: str | Path) -> DataSpec:
    """The bands and radiometry the dataset was made with (manifest key ``data``; 8-bit RGB when absent)."""
    return DataSpec.from_config(_manifest(data_dir).get("data"))


@dataclass
class Levels:
    """Per tile, the steps of its stored data type in model units, to quantise a made LR as the ETL stores it:
    (N, C, 1, 1) low and span of the radiometry, (N, 1, 1, 1) True for integer types (float types: no steps)."""

    low: torch.Tensor
    span: torch.Tensor
    integer: torch.Tensor

    @classmethod
    def of(cls, spec: DataSpec, dtypes: list[str]) -> Levels:
        ranges = [spec.band_range(d) for d in dtypes]
        low = torch.tensor([r.low for r in ranges], dtype=torch.float32)[..., None, None]
        span = torch.tensor([[h - lo for lo, h in zip(r.low, r.high, strict=True)] for r in ranges],
                            dtype=torch.float32)[..., None, None]
        integer = torch.tensor([np.issubdtype(np.dtype(d), np.integer) for d in dtypes])[:, None, None, None]
        return cls(low, span, integer)

    def select(self, index: list[int]) -> Levels:
        return Levels(self.low[index], self.span[index], self.integer[index])

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) model values -> the nearest values the stored type can hold, within [0, 1]."""
        clamped = images.clamp(0, 1)
        stepped = clamped.mul(self.span).add(self.low).round().sub(self.low).div(self.span)
        return torch.where(self.integer, stepped, clamped)


@dataclass
class TileSet:
    """The distinct HR tiles of a split as (N, C, T, T) float32 model values, with their data type's levels."""

    pixels: torch.Tensor
    levels: Levels

    def __len__(self) -> int:
        return self.pixels.shape[0]


def _model_values(arrays: list[np.ndarray], dtypes: list[str], spec: DataSpec) -> torch.Tensor:
    """(H, W, C) stored arrays -> (N, C, H, W) float32 model values, each by its data type's radiometry."""
    stacked = np.stack([spec.to_model(a.transpose(2, 0, 1), d) for a, d in zip(arrays, dtypes, strict=True)])
    return torch.from_numpy(np.ascontiguousarray(stacked))  # (N, C, H, W) in memory too: convolutions see one layout


def _check_bands(arrays: list[np.ndarray], spec: DataSpec, where: str) -> None:
    if arrays and arrays[0].shape[2] != spec.channels:
        raise DataError(f"{where} holds {arrays[0].shape[2]}-band tiles but its manifest records {spec.describe()}; "
                        "re-run the etl stage")


def load_hr_tiles(data_dir: str | Path, split: str) -> TileSet:
    """Every distinct HR tile of a split, in file order."""
    spec = data_spec(data_dir)
    seen, arrays = set(), []
    for row in _read(Path(data_dir), split, ["tile_id", "hr_image"]):
        if row["tile_id"] not in seen:
            seen.add(row["tile_id"])
            arrays.append(decode_tile(row["hr_image"]))
    if not arrays:
        raise DataError(f"the {split} split of {data_dir} is empty: add data or change etl.splits")
    _check_bands(arrays, spec, f"the {split} split of {data_dir}")
    dtypes = [a.dtype.name for a in arrays]
    return TileSet(_model_values(arrays, dtypes, spec), Levels.of(spec, dtypes))


@dataclass
class PairSet:
    """Stored LR/HR pairs of one split at one scale as float32 model values, (N, C, h, w) and (N, C, H, W)."""

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
    spec = data_spec(data_dir)
    rows = _read(Path(data_dir), split, ["tile_id", "scale", "hr_image", "lr_image"])
    by_scale: dict[float, list[dict]] = {}
    for row in rows:
        by_scale.setdefault(row["scale"], []).append(row)
    pairs = {}
    for scale in sorted(by_scale):
        chosen = _evenly_spaced(by_scale[scale], limit)
        hr = [decode_tile(r["hr_image"]) for r in chosen]
        lr = [decode_tile(r["lr_image"]) for r in chosen]
        _check_bands(hr, spec, f"the {split} split of {data_dir}")
        dtypes = [a.dtype.name for a in hr]
        pairs[scale] = PairSet(scale, _model_values(lr, dtypes, spec), _model_values(hr, dtypes, spec),
                               [r["tile_id"] for r in chosen])
    if not pairs:
        raise DataError(f"the {split} split of {data_dir} is empty: add data or change etl.splits")
    return pairs
