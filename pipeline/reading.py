"""Source images as the ETL reads them: rows of pixels with their valid mask, whatever the file format.

* PNG and JPEG: decoded whole by `hndsr.images` (the 8-bit RGB rule), every pixel valid; `etl.max_image_pixels`
  bounds them (a decompression bomb is refused from the header).
* TIFF and GeoTIFF: opened with rasterio (`hndsr.raster`) and read one row of tiles at a time, so a scene is never
  in memory whole; S3 objects are streamed to a temporary file first. The bands are `etl.bands` (or the
  `etl.source_bands` entry matching the file), by default 1, 2, 3 (a one-band raster's band three times); a pixel
  is nodata where GDAL's dataset mask says so (nodata value, internal mask, alpha) or, in float rasters, where a
  band is not finite. Float64 is stored as float32 (the model computes in float32).

`radiometry` turns the params into the dataset's `DataSpec`: fixed scales, or per-band percentiles of the valid
pixels of the training split, sampled from each raster at reduced resolution (GDAL reads overviews when the file
has them) before any tile is cut, so the near-uniform filter already works in model units.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np

from hndsr import raster
from hndsr.images import ImageDecodeError, decode_rgb
from hndsr.raster import KINDS, BandRange, DataSpec, RasterError
from pipeline.config import EtlParams
from pipeline.sources import SourceFile, sha256_of
from pipeline.tiling import SplitAssigner, grid_shape, group_id

TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
SAMPLE_SIDE = 512  # longest side of the reduced read that percentiles are computed from
SAMPLE_PIXELS = 65_536  # valid training pixels kept per source for percentiles (evenly strided)
STORED = {"uint8": "uint8", "uint16": "uint16", "int16": "int16", "float32": "float32", "float64": "float32"}


def is_raster(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in TIFF_SUFFIXES


class SourceImage:
    """One source image: `rows(y0, y1)` -> ((C, y1 - y0, W) stored values, (y1 - y0, W) bool valid mask)."""

    height: int
    width: int
    dtype: str  # the tiles' stored data type
    sha256: str
    size: int  # bytes
    info: dict  # what the manifest records about the file beyond its size and hash

    @property
    def kind(self) -> str:
        return KINDS[self.dtype]

    def rows(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """A reduced-resolution read of the whole image: (C, h, w) values and (h, w) valid mask."""
        raise NotImplementedError


class ArrayImage(SourceImage):
    """A PNG or JPEG decoded to 8-bit RGB."""

    def __init__(self, rgb: np.ndarray, data: bytes) -> None:
        self.values = rgb.transpose(2, 0, 1)  # a (3, H, W) view; rows() slices it
        self.height, self.width = rgb.shape[:2]
        self.dtype = "uint8"
        self.sha256, self.size = hashlib.sha256(data).hexdigest(), len(data)
        self.info = {}

    def rows(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        values = self.values[:, y0:y1]
        return values, np.ones(values.shape[1:], dtype=bool)

    def sample(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, math.ceil(max(self.height, self.width) / max_side))
        values = self.values[:, ::step, ::step]
        return values, np.ones(values.shape[1:], dtype=bool)


class RasterImage(SourceImage):
    """A TIFF or GeoTIFF read through rasterio, window by window."""

    def __init__(self, dataset, indexes: list[int], sha256: str, size: int) -> None:
        self.dataset, self.indexes = dataset, indexes
        self.height, self.width = dataset.height, dataset.width
        self.dtype = STORED[dataset.dtypes[0]]
        self.sha256, self.size = sha256, size
        crs = dataset.crs
        self.info = {
            "crs": crs.to_string() if crs else None,
            "pixel_size": [round(v, 12) for v in raster.pixel_size(dataset.transform)],
            "dtype": dataset.dtypes[0],
            "bands_read": indexes,
            "band_count": dataset.count,
            "nodata": dataset.nodata if dataset.nodata is None or math.isfinite(dataset.nodata) else str(dataset.nodata),
        }

    def rows(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window

        values, valid = raster.read_window(self.dataset, self.indexes, Window(0, y0, self.width, y1 - y0))
        return values.astype(self.dtype, copy=False), valid

    def sample(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.enums import Resampling

        step = max(1, math.ceil(max(self.height, self.width) / max_side))
        shape = (math.ceil(self.height / step), math.ceil(self.width / step))
        values = self.dataset.read(self.indexes, out_shape=(len(self.indexes), *shape), resampling=Resampling.nearest)
        valid = self.dataset.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
        if values.dtype.kind == "f":
            valid &= np.isfinite(values).all(axis=0)
        return values.astype(self.dtype, copy=False), valid


@contextlib.contextmanager
def open_image(item: SourceFile, params: EtlParams) -> Iterator[SourceImage]:
    """Open one source file; ImageDecodeError (RasterError for rasters) or OSError with the reason to skip it."""
    if not is_raster(item.key):
        if params.channels != 3:
            raise RasterError(f"PNG and JPEG images are RGB; etl.bands asks for {params.channels} bands (use "
                              "GeoTIFF sources, or leave etl.bands null)")
        data = item.read()
        yield ArrayImage(decode_rgb(data, max_pixels=params.max_image_pixels), data)
        return
    with item.local() as path:
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty file")
        with contextlib.ExitStack() as stack:
            try:
                dataset = stack.enter_context(raster.open_raster(path))
            except RasterError as exc:  # GDAL names the (maybe temporary) path; the manifest names the source
                raise RasterError(str(exc).replace(f"'{path}' ", "it is ").replace(str(path), "the file")) from None
            yield _raster_image(item, params, dataset, path)


def _raster_image(item: SourceFile, params: EtlParams, dataset, path) -> RasterImage:
    if dataset.dtypes[0] not in KINDS or len(set(dataset.dtypes)) > 1:
        raise raster.UnsupportedDtype(f"unsupported data type {'/'.join(sorted(set(dataset.dtypes)))}; "
                                      f"supported: {', '.join(KINDS)} (one type for every band)")
    indexes = params.bands_of(item.key) or ([1, 1, 1] if dataset.count == 1 else [1, 2, 3])
    missing = [b for b in indexes if b > dataset.count]
    if missing:
        raise raster.BandMismatch(f"band {missing[0]} does not exist: the raster has bands 1..{dataset.count}; "
                                  "choose its bands with etl.source_bands (a glob on the source path -> "
                                  "1-based indexes)")
    return RasterImage(dataset, indexes, sha256_of(path), path.stat().st_size)


# --------------------------------------------------------------------------------------------------- radiometry
def fixed_spec(params: EtlParams) -> DataSpec:
    return DataSpec.fixed(params.names, params.radiometry.scale)


def percentile_spec(params: EtlParams, samples: dict[str, list[np.ndarray]]) -> tuple[DataSpec, dict]:
    """The dataset's DataSpec with per-band percentiles of the sampled training pixels for each kind sampled
    (16-bit, float); other kinds keep their fixed mapping. Returns it and a record for the manifest."""
    spec = fixed_spec(params)
    radiometry = dict(spec.radiometry)
    record = {}
    low_q, high_q = params.radiometry.percentiles
    for kind in sorted(samples):
        values = np.concatenate(samples[kind], axis=1).astype(np.float64)  # (C, N)
        lows, highs = np.percentile(values, [low_q, high_q], axis=1)
        highs = np.where(highs > lows, highs, lows + (1.0 if kind == "16bit" else max(abs(lows).max(), 1.0) * 1e-3))
        radiometry[kind] = BandRange("percentile", tuple(float(v) for v in lows), tuple(float(v) for v in highs))
        record[kind] = {"pixels": int(values.shape[1]), "percentiles": [low_q, high_q]}
    return DataSpec(spec.bands, radiometry), record


def training_sample(image: SourceImage, key: str, params: EtlParams, splits: SplitAssigner) -> np.ndarray | None:
    """(C, N) valid pixels of the training split from a reduced read of `image` (at most SAMPLE_PIXELS), or None."""
    values, valid = image.sample(SAMPLE_SIDE)
    step_y, step_x = image.height / values.shape[1], image.width / values.shape[2]
    n_rows, n_cols = grid_shape(image.height, image.width, params.tile_size)
    # The split of every whole tile; pixels outside whole tiles are never in the dataset.
    train = np.zeros((n_rows + 1, n_cols + 1), dtype=bool)
    by_group: dict[str, bool] = {}
    for row in range(n_rows):
        for col in range(n_cols):
            group = group_id(key, row, col, group_by=params.effective_group_by, block_tiles=params.block_tiles,
                             group_regex=params.group_regex)
            if group not in by_group:
                by_group[group] = splits(group) == "train"
            train[row, col] = by_group[group]
    ys = np.minimum((np.arange(values.shape[1]) * step_y).astype(np.int64) // params.tile_size, n_rows)
    xs = np.minimum((np.arange(values.shape[2]) * step_x).astype(np.int64) // params.tile_size, n_cols)
    keep = valid & train[np.ix_(ys, xs)]
    if not keep.any():
        return None
    chosen = values[:, keep]
    stride = max(1, math.ceil(chosen.shape[1] / SAMPLE_PIXELS))
    return chosen[:, ::stride]
