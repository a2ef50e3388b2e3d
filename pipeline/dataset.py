"""The Parquet split files: their schema, a streaming writer, and the content hashes in the manifest.

One row per HR tile and scale. Rows are written in a deterministic order (sources by key, tiles in raster
order, scales ascending) in fixed-size row groups, so the same inputs and params give byte-identical files.

The split hash is a SHA-256 over each row's ``tile_id, scale, hr_sha256, lr_sha256`` in file order: it
depends on the pixels and the split assignment only, not on PNG, TIFF or Parquet encoder versions.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),  # "<source_id>@y<y>x<x>"
        pa.field("source_id", pa.string(), nullable=False),  # key of the source image (path or S3 key)
        pa.field("group_id", pa.string(), nullable=False),  # split group (image, or mosaic block)
        pa.field("split", pa.string(), nullable=False),  # train, val or test (by group: a group is in one split)
        pa.field("scale", pa.float64(), nullable=False),  # HR size / LR size, one of etl.scales
        pa.field("y", pa.int32(), nullable=False),  # HR tile origin in the source image, pixels
        pa.field("x", pa.int32(), nullable=False),  # (the column of that origin)
        pa.field("hr_height", pa.int32(), nullable=False),  # HR tile size, pixels (etl.tile_size)
        pa.field("hr_width", pa.int32(), nullable=False),  # (its width)
        pa.field("lr_height", pa.int32(), nullable=False),  # LR tile size: the HR size / scale
        pa.field("lr_width", pa.int32(), nullable=False),  # (its width)
        pa.field("bands", pa.int32(), nullable=False),  # bands per tile (manifest `data.bands` names them)
        pa.field("dtype", pa.string(), nullable=False),  # stored data type: uint8, uint16, int16, float32
        pa.field("hr_image", pa.binary(), nullable=False),  # PNG for 8-bit RGB, else TIFF (hndsr.splits)
        pa.field("lr_image", pa.binary(), nullable=False),  # the LR tile, encoded as the HR one
        pa.field("hr_sha256", pa.string(), nullable=False),  # content hash of the HR pixels
        pa.field("lr_sha256", pa.string(), nullable=False),  # content hash of the LR pixels
        pa.field("lr_origin", pa.string(), nullable=False),  # "degraded" (hndsr.degradation) or "paired"
    ]
)
ROW_GROUP_ROWS = 256
_STATISTICS_COLUMNS = [f.name for f in SCHEMA if not pa.types.is_binary(f.type)]


class SplitWriter:
    """Streams the rows of one split into a Parquet file and keeps the counts and hash for the manifest."""

    def __init__(self, path: Path, split: str) -> None:
        self.path = path
        self.split = split
        self._writer = pq.ParquetWriter(
            path, SCHEMA, compression="zstd", write_statistics=_STATISTICS_COLUMNS, use_dictionary=True
        )
        self._buffer: list[dict] = []
        self._hash = hashlib.sha256()
        self._rows_per_scale: Counter[float] = Counter()
        self._tiles: set[str] = set()
        self._groups: set[str] = set()
        self._sources: set[str] = set()

    def add(self, row: dict) -> None:
        self._buffer.append(row)
        self._hash.update(f"{row['tile_id']}\t{row['scale']!r}\t{row['hr_sha256']}\t{row['lr_sha256']}\n".encode())
        self._rows_per_scale[row["scale"]] += 1
        self._tiles.add(row["tile_id"])
        self._groups.add(row["group_id"])
        self._sources.add(row["source_id"])
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA))
            self._buffer = []

    def close(self) -> dict:
        """Finish the file; return this split's manifest entry."""
        self._flush()
        self._writer.close()
        return {
            "file": self.path.name,
            "rows": sum(self._rows_per_scale.values()),
            "tiles": len(self._tiles),
            "groups": len(self._groups),
            "sources": len(self._sources),
            "rows_per_scale": {format_scale(s): n for s, n in sorted(self._rows_per_scale.items())},
            "sha256": self._hash.hexdigest(),
        }


def format_scale(scale: float) -> str:
    """Stable text key for a scale in JSON: 2.0 -> "2", 2.5 -> "2.5"."""
    return f"{scale:g}"


def dataset_hash(split_hashes: dict[str, str]) -> str:
    """The whole dataset's hash: SHA-256 over the split names and their hashes."""
    text = "".join(f"{name}:{split_hashes[name]}\n" for name in sorted(split_hashes))
    return hashlib.sha256(text.encode()).hexdigest()

