"""Rasters (GeoTIFF and any other file GDAL reads): bands, radiometry and nodata, read and written with rasterio.

The model works on float pixels in [0, 1], one channel per band it was trained on. `DataSpec` says which bands
those are and how stored values map to that range and back (the radiometry); it is recorded in the checkpoint
(the autoencoder's config.json, key ``data``) and applied by everything that reads or writes pixels.

Radiometry, per kind of stored value (``8bit``: uint8; ``16bit``: uint16 and int16; ``float``: float32 and
float64), per band: ``model = (stored - low) / (high - low)`` and back ``stored = low + model * (high - low)``,
rounded half up and clipped to the type's range for integers. ``method`` says where low and high came from:
``fixed`` (low 0, high = a declared scale: 255 for 8-bit, which is exactly what PNG and JPEG inputs get;
65535 for 16-bit and 1 for float unless the params say otherwise, e.g. 10000 for reflectance x 10000) or
``percentile`` (per-band percentiles of the training split). The model only sees [0, 1]: stored values outside
the mapped range are clipped by the model's bicubic step, so an output never leaves the mapped range.

Nodata: a pixel is nodata where GDAL's dataset mask says so (the nodata value of every band, an internal mask,
or an alpha band), and in float rasters where any band is not finite (NaN without a declared nodata value comes
back as NaN). Before inference nodata pixels are filled from their valid neighbours (GDAL's
``fillnodata``: inverse-distance interpolation), so valid pixels at a collar's edge are never pulled toward the
fill value; after inference the mask is upscaled (nearest, by pixel centre) and those output pixels are set back
to nodata.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from affine import Affine

from hndsr.errors import UserError
from hndsr.images import ImageDecodeError

if TYPE_CHECKING:
    import rasterio
    from rasterio.windows import Window


def _rasterio() -> ModuleType:
    """rasterio (and GDAL), imported at the first raster read or write, not with this module: the model, the engine
    and the PNG paths never need it (a GPU machine given only what they import can run them). Every process that
    reads rasters here treats a raster without georeference as normal (stored tiles, plain TIFF uploads): the
    warning rasterio gives for it is silenced process-wide, as the ETL's encoding threads need (catch_warnings() is
    not thread-safe)."""
    import rasterio
    import rasterio.enums
    import rasterio.errors
    import rasterio.fill
    import rasterio.io
    import rasterio.shutil
    import rasterio.windows

    # At every call, not once: a caller's catch_warnings() (pytest's, per test) may have dropped it since. The
    # filter list keeps one copy (filterwarnings replaces an equal entry).
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    return rasterio

KINDS = {"uint8": "8bit", "uint16": "16bit", "int16": "16bit", "float32": "float", "float64": "float"}
DEFAULT_SCALES = {"8bit": 255.0, "16bit": 65535.0, "float": 1.0}
DEFAULT_BANDS = ("red", "green", "blue")
FILL_DISTANCE = 64  # LR pixels searched by fillnodata; farther nodata gets the band mean of valid pixels
BLOCK = 512  # output GeoTIFF block edge
GDAL_CACHE_MB = 256  # GDAL's block cache for scene reads (default: 5 % of RAM), so memory does not grow with scenes


class RasterError(ImageDecodeError, UserError):
    """A raster that cannot be read or that the model cannot take; the message says what to fix."""


class BandMismatch(RasterError):
    """The input's band count is not the model's."""


class UnsupportedDtype(RasterError):
    """A data type the radiometry does not cover."""


class BadGeoreference(RasterError):
    """A coordinate reference system or transform that cannot be read."""


class UnsupportedOutput(RasterError):
    """An output format that cannot carry the result (PNG for more than 8-bit RGB)."""


class TooManyBands(RasterError):
    """More bands than the reader decodes (a block of a pixel-interleaved raster holds every band)."""


class OutOfRange(RasterError):
    """Stored values far outside the range the model's radiometry maps for their type: the model would clip them
    (e.g. reflectance x 10000 stored as float, given to a model that maps floats from 0..1)."""


# Values more than half the mapped range's width beyond it count as out of range; an input with more than this
# share of them in any band is refused (a percentile radiometry clips its tails by design: those stay within).
OUT_OF_RANGE_SHARE = 0.01
SAMPLE_EDGE = 1024  # check_range on a scene: its values read decimated to at most this many px a side


@dataclass(frozen=True)
class BandRange:
    """How one kind of stored value maps to the model's [0, 1]: per band, ``(v - low) / (high - low)``."""

    method: str  # fixed | percentile
    low: tuple[float, ...]
    high: tuple[float, ...]

    def to_config(self) -> dict:
        return {"method": self.method, "low": list(self.low), "high": list(self.high)}


@dataclass(frozen=True)
class DataSpec:
    """The bands a model was trained on and the radiometry of each kind of stored value."""

    bands: tuple[str, ...]
    radiometry: Mapping[str, BandRange]

    @property
    def channels(self) -> int:
        return len(self.bands)

    @classmethod
    def fixed(cls, bands: tuple[str, ...] = DEFAULT_BANDS, scales: Mapping[str, float] | None = None) -> DataSpec:
        """Low 0 and high = the scale of each kind (`DEFAULT_SCALES` where `scales` names none), every band."""
        scales = {**DEFAULT_SCALES, **(scales or {})}
        n = len(bands)
        return cls(tuple(bands), {kind: BandRange("fixed", (0.0,) * n, (float(scales[kind]),) * n)
                                  for kind in DEFAULT_SCALES})

    @classmethod
    def from_config(cls, data: Mapping | None) -> DataSpec:
        """From a checkpoint's ``data`` entry; None (checkpoints from before bands and radiometry were recorded):
        RGB with the fixed default scales, which is what those models were trained with."""
        if data is None:
            return cls.fixed()
        bands = tuple(str(b) for b in data["bands"])
        radiometry = {kind: BandRange(str(r["method"]), tuple(map(float, r["low"])), tuple(map(float, r["high"])))
                      for kind, r in data["radiometry"].items()}
        spec = cls(bands, radiometry)
        spec.validate()
        return spec

    def to_config(self) -> dict:
        return {"bands": list(self.bands), "radiometry": {k: r.to_config() for k, r in sorted(self.radiometry.items())}}

    def validate(self) -> None:
        for kind, band_range in self.radiometry.items():
            if kind not in DEFAULT_SCALES:
                raise ValueError(f"radiometry: unknown kind {kind!r} (known: {', '.join(DEFAULT_SCALES)})")
            if not len(band_range.low) == len(band_range.high) == self.channels:
                raise ValueError(f"radiometry.{kind}: {len(band_range.low)} lows and {len(band_range.high)} highs "
                                 f"for {self.channels} bands")
            if any(not (math.isfinite(lo) and math.isfinite(hi) and hi > lo)
                   for lo, hi in zip(band_range.low, band_range.high, strict=True)):
                raise ValueError(f"radiometry.{kind}: every high must be finite and above its low")

    def display_bands(self) -> list[int]:
        """0-based indexes of the bands to show as an RGB picture: those named red, green and blue, else the first
        three (a one- or two-band model: its first band as gray)."""
        if {"red", "green", "blue"} <= set(self.bands):
            return [self.bands.index(name) for name in ("red", "green", "blue")]
        return [0, 1, 2] if self.channels >= 3 else [0, 0, 0]

    def describe(self) -> str:
        return f"{self.channels} bands ({', '.join(self.bands)})"

    def band_range(self, dtype: str) -> BandRange:
        kind = KINDS.get(str(dtype))
        if kind is None:
            raise UnsupportedDtype(f"unsupported data type {dtype}; supported: {', '.join(KINDS)}")
        return self.radiometry[kind]

    def to_model(self, values: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """(C, h, w) stored values -> (C, h, w) float32 model values (not clipped)."""
        band_range = self.band_range(dtype or values.dtype.name)
        low, high = _column(band_range.low), _column(band_range.high)
        return ((values.astype(np.float32) - low) / (high - low)).astype(np.float32, copy=False)

    def from_model(self, values: np.ndarray, dtype: str) -> np.ndarray:
        """(C, H, W) float model values -> (C, H, W) stored values of `dtype` (integers rounded half up, clipped).
        In float32, as `hndsr.images.to_uint8`, so 8-bit results are bit-identical to the PNG path's."""
        band_range = self.band_range(dtype)
        low, high = _column(band_range.low), _column(band_range.high)
        stored = low + values.astype(np.float32, copy=False) * (high - low)
        if np.issubdtype(np.dtype(dtype), np.integer):
            info = np.iinfo(dtype)
            return np.floor(stored + np.float32(0.5)).clip(info.min, info.max).astype(dtype)
        return stored.astype(dtype)

    def image_to_model(self, pixels: np.ndarray) -> np.ndarray:
        """(h, w, C) stored values -> (h, w, C) float32 model values."""
        return np.ascontiguousarray(self.to_model(pixels.transpose(2, 0, 1)).transpose(1, 2, 0))

    def image_from_model(self, output: np.ndarray, dtype: str) -> np.ndarray:
        """(H, W, C) float model values -> (H, W, C) stored values of `dtype`."""
        return np.ascontiguousarray(self.from_model(output.transpose(2, 0, 1), dtype).transpose(1, 2, 0))


def _column(values: tuple[float, ...], dtype=np.float32) -> np.ndarray:
    return np.asarray(values, dtype=dtype)[:, None, None]


def crs_error() -> type[Exception]:
    """rasterio's error for an unreadable coordinate reference system."""
    return _rasterio().errors.CRSError


# ------------------------------------------------------------------------------------------------------ reading
@contextlib.contextmanager
def open_raster(source: str | Path | bytes) -> Iterator[rasterio.DatasetReader]:
    """Open a path or in-memory bytes with rasterio; RasterError with GDAL's reason when it cannot."""
    rasterio = _rasterio()
    try:
        if isinstance(source, bytes):
            with rasterio.io.MemoryFile(source) as memory, memory.open() as dataset:
                yield dataset
        else:
            with rasterio.open(source) as dataset:
                yield dataset
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"cannot read the raster: {gdal_reason(exc)}") from None


_MEMORY_NAME = re.compile(r"'?(/vsimem/)?[^\s,']*[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}[^\s,':]*'?[,:]?\s*")


def gdal_reason(exc: BaseException) -> str:
    """GDAL's own reason for a rasterio error on one line: the underlying GDAL error where rasterio only says "See
    previous exception for details", without the name of an in-memory file (an upload's internal name)."""
    cause = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    if "previous exception" in text and cause is not None:
        text = str(cause.args[2] if getattr(cause, "args", None) and len(cause.args) == 3 else cause)
    text = text.splitlines()[0] if text else type(exc).__name__
    return _MEMORY_NAME.sub("", text).strip().rstrip(".")


def data_bands(dataset: rasterio.DatasetReader, bands: list[int] | None, spec: DataSpec,
               option: str = "`bands`") -> list[int]:
    """The 1-based band indexes to feed the model: `bands` if given, else every band that is not alpha; checked
    against the model's band count and data type (RasterError saying what the model expects; `option`: how the
    caller's user chooses bands, the form field or `--bands`)."""
    rasterio = _rasterio()
    if dataset.dtypes[0] not in KINDS or len(set(dataset.dtypes)) > 1:
        raise UnsupportedDtype(f"unsupported data type {'/'.join(sorted(set(dataset.dtypes)))}; supported: "
                          f"{', '.join(KINDS)} (one type for every band)")
    if bands is None:
        alpha = rasterio.enums.ColorInterp.alpha
        indexes = [i for i, c in zip(dataset.indexes, dataset.colorinterp, strict=True) if c != alpha]
    else:
        bad = [b for b in bands if not 1 <= b <= dataset.count]
        if bad:
            raise BandMismatch(f"band {bad[0]} does not exist: the raster has bands 1..{dataset.count}")
        indexes = list(bands)
    if len(indexes) != spec.channels:
        raise BandMismatch(f"the model expects {spec.describe()}; the raster has {len(indexes)} data band"
                          f"{'s' if len(indexes) != 1 else ''}" + ("" if bands else f"; choose them with {option} "
                                                                   "(1-based band indexes, e.g. 1,2,3)"))
    return indexes


def read_window(dataset: rasterio.DatasetReader, indexes: list[int],
                window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w) stored values and the (h, w) bool valid mask of `window`: GDAL's dataset mask, and for floats
    also finite in every band (NaN is a common undeclared nodata in float rasters)."""
    rasterio = _rasterio()
    try:
        values = dataset.read(indexes, window=window)
        # Validity from the chosen bands' masks only (a per-dataset mask or alpha is every band's mask; with nodata
        # values a pixel is valid where any chosen band is, as GDAL's dataset mask does over all bands): the bands
        # not fed to the model are never decoded for it.
        valid = np.logical_or.reduce(dataset.read_masks(indexes, window=window) > 0, axis=0)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"cannot read the raster's pixels: the file is truncated or corrupt ({gdal_reason(exc)})") \
            from None
    if values.dtype.kind == "f":
        valid &= np.isfinite(values).all(axis=0)
    return values, valid


def read_rows(dataset: rasterio.DatasetReader, indexes: list[int], *, rows: int = 256,
              check: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """read_window of the whole raster, `rows` rows at a time, calling `check` before each (it raises to stop: a
    deadline); memory is the chosen bands' pixels, and GDAL's block cache is bounded (GDAL_CACHE_MB)."""
    rasterio = _rasterio()
    values = np.empty((len(indexes), dataset.height, dataset.width), dtype=dataset.dtypes[0])
    valid = np.empty((dataset.height, dataset.width), dtype=bool)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        for start in range(0, dataset.height, rows):
            if check is not None:
                check()
            stop = min(start + rows, dataset.height)
            window = rasterio.windows.Window(0, start, dataset.width, stop - start)
            values[:, start:stop], valid[start:stop] = read_window(dataset, indexes, window)
    return values, valid


def check_range(values: np.ndarray, valid: np.ndarray, spec: DataSpec, dtype: str, indexes: list[int]) -> None:
    """OutOfRange unless the valid (C, h, w) stored `values` of bands `indexes` lie in the range the model maps
    for `dtype` (its declared radiometry), allowing half the range's width on either side and OUT_OF_RANGE_SHARE of
    values beyond that. Never clip silently: a float raster in other units than the model's is refused, saying
    which range it has and which the model maps."""
    band_range = spec.band_range(dtype)
    for band, index in enumerate(indexes):
        low, high = band_range.low[band], band_range.high[band]
        margin = (high - low) / 2
        given = values[band][valid]
        if given.size == 0:
            continue
        outside = int(np.count_nonzero((given < low - margin) | (given > high + margin)))
        if outside > OUT_OF_RANGE_SHARE * given.size:
            raise OutOfRange(
                f"band {index}'s values lie in {float(given.min()):.6g}..{float(given.max()):.6g}, but this model maps "
                f"{dtype} values from {low:.6g}..{high:.6g} ({band_range.method} radiometry, "
                f"`data.radiometry.{KINDS[dtype]}` of the model): {outside / given.size:.0%} of them lie far beyond "
                "it and would be clipped. Rescale the raster into the model's range (reflectance x 10000 for a model "
                "of 0..1: divide by 10000), or use a model trained on data in these units (etl.radiometry)")


def check_scene_range(dataset: rasterio.DatasetReader, indexes: list[int], spec: DataSpec) -> None:
    """check_range on a whole raster from a decimated read (overviews when the file has them), before any work."""
    factor = max(1, math.ceil(max(dataset.width, dataset.height) / SAMPLE_EDGE))
    shape = (len(indexes), max(1, dataset.height // factor), max(1, dataset.width // factor))
    values = dataset.read(indexes, out_shape=shape)
    valid = dataset.dataset_mask(out_shape=shape[1:]) > 0
    if values.dtype.kind == "f":
        valid &= np.isfinite(values).all(axis=0)
    check_range(values, valid, spec, dataset.dtypes[0], indexes)


def model_input(values: np.ndarray, valid: np.ndarray, spec: DataSpec) -> np.ndarray:
    """(C, h, w) stored values + valid mask -> (h, w, C) float32 model input, nodata filled (`fill_invalid`)."""
    x = spec.to_model(values)
    if not valid.all():
        if valid.any():
            fill_invalid(x, valid)
        else:
            x[...] = 0.5  # nothing valid to continue; the output here is nodata anyway
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def fill_invalid(x: np.ndarray, valid: np.ndarray) -> None:
    """Fill the invalid pixels of float32 (C, h, w) `x` in place from their valid neighbours (GDAL's fillnodata,
    inverse-distance), and with the band's valid mean where nothing valid is within FILL_DISTANCE."""
    rasterio = _rasterio()
    mask = valid.astype(np.uint8)
    # Which nodata pixels have a valid pixel within FILL_DISTANCE: fill the mask itself the same way.
    reached = rasterio.fill.fillnodata(mask.astype(np.float32), mask=mask, max_search_distance=FILL_DISTANCE,
                                       smoothing_iterations=0) > 0
    for band in x:
        filled = rasterio.fill.fillnodata(band, mask=mask, max_search_distance=FILL_DISTANCE, smoothing_iterations=0)
        band[...] = np.where(reached, filled, band[valid].mean())


def upscale_mask(valid: np.ndarray, origin: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int],
                 scale: tuple[float, float]) -> np.ndarray:
    """The output's valid mask for output rows [r0, r1) and columns [c0, c1) (whole-scene indexes), by nearest
    LR pixel centre: output pixel j lies over LR pixel floor((j + 0.5) / scale). `valid` covers the LR window
    starting at `origin` (whole-scene row, column)."""
    ys = np.floor((np.arange(*rows) + 0.5) / scale[0]).astype(np.int64) - origin[0]
    xs = np.floor((np.arange(*cols) + 0.5) / scale[1]).astype(np.int64) - origin[1]
    ys = ys.clip(0, valid.shape[0] - 1)
    xs = xs.clip(0, valid.shape[1] - 1)
    return valid[np.ix_(ys, xs)]


def stored_output(output: np.ndarray, valid: np.ndarray, spec: DataSpec, dtype: str,
                  nodata: float | None) -> np.ndarray:
    """(H, W, C) float model output + (H, W) valid mask -> (C, H, W) stored values of `dtype`, nodata where the
    mask is invalid (when the raster has a nodata value; otherwise NaN for floats, and the mask is written as the
    file's mask where the input had one), and never the nodata value in every band where it is valid."""
    stored = spec.from_model(output.transpose(2, 0, 1), dtype)
    if nodata is not None:
        fill = np.asarray(nodata).astype(dtype)
        # A valid pixel whose every band came out equal to the nodata value would read as nodata: its first
        # band moves one step off it (the next integer, or the next float), as GDAL's tools do.
        collide = valid & (stored == fill).all(axis=0)
        if collide.any():
            if np.issubdtype(np.dtype(dtype), np.integer):
                step = fill + 1 if fill < np.iinfo(dtype).max else fill - 1
            else:
                step = np.nextafter(fill, np.inf if np.isfinite(fill) else 0).astype(dtype)
            stored[0][collide] = step
        if not valid.all():
            stored[:, ~valid] = fill
    elif stored.dtype.kind == "f" and not valid.all():
        stored[:, ~valid] = np.nan  # a float raster without a nodata value: NaN marks what was not valid
    return stored


# ------------------------------------------------------------------------------------------------------ writing
def refined_transform(transform: Affine, scale: float) -> Affine:
    """The input's transform with the pixel size divided by `scale`, same origin."""
    return transform @ Affine.scale(1 / scale)


def has_mask(dataset: rasterio.DatasetReader) -> bool:
    """True when validity comes from a mask or alpha band (not from a nodata value, and not all valid)."""
    rasterio = _rasterio()
    flags_ = rasterio.enums.MaskFlags
    return any(flags_.all_valid not in flags and flags_.nodata not in flags
               for flags in dataset.mask_flag_enums)


def output_profile(dtype: str, count: int, width: int, height: int, *, crs=None, transform: Affine | None = None,
                   nodata: float | None = None) -> dict:
    """GeoTIFF creation options for a super-resolved raster: the input's CRS, data type, band count and nodata on
    the given grid; tiled (512 px blocks) when large, deflate-compressed with the predictor that suits the type,
    BigTIFF when needed; every band a data band (no alpha). No transform: not georeferenced."""
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": count, "dtype": dtype,
        "crs": crs, "nodata": nodata,
        "compress": "deflate", "predictor": 3 if KINDS[dtype] == "float" else 2, "interleave": "pixel",
        "BIGTIFF": "IF_SAFER",
    }
    if transform is not None:
        profile["transform"] = transform
    if not (count == 3 and dtype == "uint8"):
        profile["photometric"] = "MINISBLACK"  # else GDAL takes a 4th 8-bit band (e.g. near-infrared) for alpha
    if width >= 2 * BLOCK or height >= 2 * BLOCK:
        profile.update(tiled=True, blockxsize=BLOCK, blockysize=BLOCK)
    return profile


def working_profile(profile: dict) -> dict:
    """The profile of the scratch raster a scene is written into window by window: `profile` tiled in BLOCK px
    blocks and uncompressed, so a block that two windows share is rewritten in place (a compressed block that is
    rewritten is appended to the file and the old one left as dead space: 3.4x the pixels' size was measured);
    `write_cog` then compresses every block once."""
    working = {k: v for k, v in profile.items() if k not in ("compress", "predictor")}
    working.update(tiled=True, blockxsize=BLOCK, blockysize=BLOCK, BIGTIFF="IF_NEEDED")  # exact when uncompressed
    return working


# GDAL's COG driver: BLOCK px tiles, deflate with the predictor of the type (2 for integers, 3 for floats),
# overviews by averaging (nodata and masked pixels left out) until one fits a tile.
COG_OPTIONS = {"COMPRESS": "DEFLATE", "PREDICTOR": "YES", "BLOCKSIZE": str(BLOCK), "OVERVIEWS": "AUTO",
               "OVERVIEW_RESAMPLING": "AVERAGE", "BIGTIFF": "IF_SAFER"}


def write_cog(source: str | Path, target: str | Path) -> None:
    """The raster at `source` as a Cloud-Optimized GeoTIFF at `target`, with its georeference, nodata, mask, band
    metadata and tags: tiled, compressed, overviews, the directories and overviews ahead of the full-resolution
    tiles, each block written once. A viewer (QGIS) or a reader over HTTP range requests fetches only the tiles
    and the overview level it shows. The overviews are a third of the pixels (1/4 + 1/16 + ...) and more of the
    bytes (69 % of the full resolution's on a x2 uint16 scene: the first level holds about the input's detail)."""
    rasterio = _rasterio()
    # Blocks compressed on this process's share of the cores (the same bytes as one thread; measured on a 16 MP
    # uint16 scene, 2 cores: 2.1 s less than one thread, the COG costing 1.4 s more than the plain GeoTIFF did).
    threads = os.environ.get("OMP_NUM_THREADS") or "ALL_CPUS"
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, GDAL_TIFF_INTERNAL_MASK=True):
        rasterio.shutil.copy(str(source), str(target), driver="COG", NUM_THREADS=threads, **COG_OPTIONS)


def copy_band_metadata(source: rasterio.DatasetReader, indexes: list[int], target) -> None:
    """Colour interpretation and band descriptions of the chosen bands (alpha is not carried: the mask is)."""
    set_band_metadata(target, [source.colorinterp[i - 1] for i in indexes],
                      [source.descriptions[i - 1] for i in indexes])


def set_band_metadata(target, interps: list | None, descriptions: list | None) -> None:
    rasterio = _rasterio()
    if interps and rasterio.enums.ColorInterp.alpha not in interps:
        with contextlib.suppress(Exception):  # some combinations GDAL refuses for a band count; not essential
            target.colorinterp = interps
    for position, description in enumerate(descriptions or [], start=1):
        if description:
            target.set_band_description(position, description)


def encode_geotiff(stored: np.ndarray, profile: dict, *, mask: np.ndarray | None = None,
                   interps: list | None = None, descriptions: list | None = None,
                   tags: dict[str, str] | None = None) -> bytes:
    """GeoTIFF bytes of (C, H, W) `stored` with `profile`; `mask` (H, W bool) written as its internal mask."""
    rasterio = _rasterio()
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.io.MemoryFile() as memory:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with memory.open(**profile) as target:
                target.write(stored)
                if mask is not None:
                    target.write_mask(mask.astype(np.uint8) * 255)
                set_band_metadata(target, interps, descriptions)
                if tags:
                    target.update_tags(**tags)
        return memory.read()


def pixel_size(transform: Affine) -> tuple[float, float]:
    """(x, y) pixel size of a north-up or rotated transform, as positive lengths."""
    return math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
