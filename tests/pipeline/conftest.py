"""Checks every ETL output must pass, whatever the source."""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from PIL import Image

from hndsr.degradation import degrade, lr_size
from hndsr.images import to_tensor, to_uint8
from pipeline.dataset import SCHEMA, dataset_hash, format_scale
from pipeline.tiling import SPLIT_PRIORITY, content_hash

SPLITS = ("train", "val", "test")


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def stored_pixels(data: bytes, dtype: str, channels: int) -> np.ndarray:
    """A stored tile: PNG for 8-bit RGB, else a (non-georeferenced) TIFF of the row's data type and band count."""
    if dtype == "uint8" and channels == 3:
        return png_pixels(data)
    with rasterio.MemoryFile(data) as memory, memory.open() as dataset:
        assert dataset.driver == "GTiff" and dataset.dtypes[0] == dtype and dataset.count == channels
        return dataset.read().transpose(1, 2, 0)


def expected_lr(hr: np.ndarray, scale: float) -> np.ndarray:
    """The LR the ETL must store: 8-bit through [0, 1]; other types degraded in stored units, rounded half up
    and clipped to the integer type's range (floats as they come)."""
    if hr.dtype == np.uint8:
        return to_uint8(degrade(to_tensor(hr), scale))[0]
    x = torch.from_numpy(hr.transpose(2, 0, 1)[None].astype(np.float32))
    if np.issubdtype(hr.dtype, np.integer):
        info = np.iinfo(hr.dtype)
        lr = degrade(x, scale, clamp=(info.min, info.max))[0].numpy()
        return np.floor(lr + np.float32(0.5)).clip(info.min, info.max).astype(hr.dtype).transpose(1, 2, 0)
    return degrade(x, scale, clamp=None)[0].numpy().astype(hr.dtype).transpose(1, 2, 0)


def load_rows(out: Path) -> dict[str, list[dict]]:
    return {split: pq.read_table(out / f"{split}.parquet").to_pylist() for split in SPLITS}


def check_dataset(out: Path, *, tile_size: int, scales: list[float], guard: bool = False) -> dict:
    """Assert the schema, sizes, degradation, hashes, manifest counts and split separation; return the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    channels = len(manifest["data"]["bands"])
    rows = load_rows(out)
    groups_by_split: dict[str, set[str]] = defaultdict(set)
    tiles_by_hash: dict[str, str] = {}
    split_hashes = {}
    for split in SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        assert table.schema.equals(SCHEMA, check_metadata=False), f"{split}: schema differs"
        entry = manifest["splits"][split]
        assert entry["rows"] == len(rows[split])
        per_scale = defaultdict(int)
        lines = []
        for row in rows[split]:
            assert row["split"] == split
            per_scale[format_scale(row["scale"])] += 1
            hr = stored_pixels(row["hr_image"], row["dtype"], channels)
            lr = stored_pixels(row["lr_image"], row["dtype"], channels)
            assert row["bands"] == channels
            assert hr.shape == (row["hr_height"], row["hr_width"], channels) == (tile_size, tile_size, channels)
            assert lr.shape == (row["lr_height"], row["lr_width"], channels)
            assert lr.shape[:2] == (lr_size(tile_size, row["scale"]),) * 2
            assert row["hr_sha256"] == content_hash(hr)
            assert row["lr_sha256"] == content_hash(lr)
            if row["lr_origin"] == "degraded":
                assert np.array_equal(expected_lr(hr, row["scale"]), lr)
            assert tiles_by_hash.setdefault(row["hr_sha256"], row["tile_id"]) == row["tile_id"], "duplicate tile"
            groups_by_split[split].add(row["group_id"])
            lines.append(f"{row['tile_id']}\t{row['scale']!r}\t{row['hr_sha256']}\t{row['lr_sha256']}\n")
        assert dict(per_scale) == entry["rows_per_scale"] == manifest["counts"][split]
        split_hashes[split] = hashlib.sha256("".join(lines).encode()).hexdigest()
        assert split_hashes[split] == entry["sha256"]
    assert dataset_hash(split_hashes) == manifest["dataset_hash"]
    assert manifest["scales"] == [format_scale(s) for s in sorted(scales)]
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not groups_by_split[a] & groups_by_split[b], f"a group is in both {a} and {b}"
    if guard:
        _check_no_neighbours_across_splits(rows, tile_size)
    return manifest


def _check_no_neighbours_across_splits(rows: dict[str, list[dict]], tile_size: int) -> None:
    where = {}
    for split, split_rows in rows.items():
        for row in split_rows:
            where[(row["source_id"], row["y"] // tile_size, row["x"] // tile_size)] = split
    for (source, r, c), split in where.items():
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                other = where.get((source, r + dr, c + dc))
                assert other is None or other == split, f"{source} tile ({r},{c}) {split} touches {other}"
    assert set(SPLIT_PRIORITY) == set(SPLITS)


@pytest.fixture
def dataset_checker():
    return check_dataset
