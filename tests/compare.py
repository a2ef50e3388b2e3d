"""Comparing outputs in tests: files by hash, rasters and images as arrays, each failing in well under a second
with a message of one line that says what differs and by how much. Never `assert a.read_bytes() == b.read_bytes()`:
on a mismatch pytest explains it with a diff of the two byte strings, which takes tens of minutes on files of
tens of megabytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    sha = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def first_difference(a: Path, b: Path) -> int | None:
    """Offset of the first byte where the files differ (the shorter one's length if one is a prefix), or None."""
    x = np.memmap(a, dtype=np.uint8, mode="r") if a.stat().st_size else np.zeros(0, np.uint8)
    y = np.memmap(b, dtype=np.uint8, mode="r") if b.stat().st_size else np.zeros(0, np.uint8)
    common = min(len(x), len(y))
    where = np.flatnonzero(x[:common] != y[:common])
    if len(where):
        return int(where[0])
    return None if len(x) == len(y) else common


def assert_same_bytes(a: Path, b: Path) -> None:
    """The two files hold the same bytes; else one line: their sizes and the first differing offset."""
    if a.stat().st_size == b.stat().st_size and digest(a) == digest(b):
        return
    pytest.fail(f"{a.name} differs: {a} has {a.stat().st_size} bytes, {b} {b.stat().st_size}; first difference at "
                f"byte {first_difference(a, b)}", pytrace=False)


def assert_same_files(a: Path, b: Path, names) -> None:
    """`assert_same_bytes` for each of `names` in folders `a` and `b`."""
    for name in names:
        assert_same_bytes(Path(a) / name, Path(b) / name)


def value_difference(x: np.ndarray, y: np.ndarray) -> tuple[int, float]:
    """How many values differ and the largest difference (NaN equals NaN)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    differ = (x64 != y64) & ~(np.isnan(x64) & np.isnan(y64))
    return int(differ.sum()), float(np.abs(x64 - y64)[differ].max()) if differ.any() else 0.0


def assert_close_rasters(a: Path, b: Path, *, max_levels: float = 0.0, max_share: float = 0.0) -> tuple[int, float]:
    """Two rasters or images (anything GDAL reads) with the same grid, georeference, type, nodata and mask whose
    values differ by at most `max_levels` (stored units) in at most `max_share` of the values. Returns (differing
    values, largest difference); fails with one line that gives both."""
    import rasterio  # here: the tests/cuda run on a GPU machine may have no rasterio (benchmarks/gpu_kit.py)

    with rasterio.open(a) as x, rasterio.open(b) as y:
        for what in ("width", "height", "count", "dtypes", "crs", "transform", "nodata"):
            if getattr(x, what) != getattr(y, what):
                pytest.fail(f"{a.name}: {what} {getattr(x, what)} in {a}, {getattr(y, what)} in {b}", pytrace=False)
        count, largest = value_difference(x.read(), y.read())
        masks = int((x.dataset_mask() != y.dataset_mask()).sum())
        total = x.width * x.height * x.count
    if masks or largest > max_levels or count > max_share * total:
        pytest.fail(f"{a.name}: {count} of {total} values differ (largest difference {largest:g}; allowed "
                    f"{max_levels:g} in {max_share:g} of the values), {masks} mask pixels differ", pytrace=False)
    return count, largest


def sha(data: bytes) -> str:
    """SHA-256 of bytes in memory: compare answers by it, so a mismatch prints two short digests."""
    return hashlib.sha256(data).hexdigest()


def digests(paths) -> dict[str, str]:
    """{file name: SHA-256} of files, for comparing folders before and after."""
    return {Path(p).name: digest(Path(p)) for p in paths}
