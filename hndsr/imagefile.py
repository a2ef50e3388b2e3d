"""One image file in memory, in and out: an upload's bytes to model values and a result back to bytes. Used by the
server (serving/) and by the registered pyfunc flavour (registry/pyfunc_model.py), so both read and write files
the same way.

TIFF (GeoTIFF or not) goes through rasterio (hndsr.raster: any band count and data type the model takes, nodata,
georeference); PNG and JPEG through hndsr.images (8-bit RGB). A GeoTIFF result has the input's CRS, its transform
with the pixel size divided by the scale, its data type, bands and nodata (the input's mask upscaled).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hndsr import raster
from hndsr.images import ImageTooLarge, decode_rgb, encode_png
from hndsr.raster import DataSpec

# A TIFF without georeference is a normal input here (it gets a TIFF without one back): hndsr.raster silences
# rasterio's warning for it whenever it uses rasterio (PNG and JPEG never import it).

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


@dataclass
class Decoded:
    lr: np.ndarray  # (h, w, C) float32 model values
    valid: np.ndarray | None  # (h, w) bool; None: every pixel valid
    dtype: str  # stored data type of the input, and of the output
    nodata: float | None = None
    has_mask: bool = False  # invalid pixels come from a mask or alpha, not a nodata value
    crs: object = None
    transform: object = None  # None: not georeferenced
    interps: list | None = None
    descriptions: list | None = None
    tags: dict | None = None

    @property
    def is_png_compatible(self) -> bool:
        return self.dtype == "uint8" and self.lr.shape[2] == 3


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


class DecodeTimeout(RuntimeError):
    """Decoding passed its deadline (checked between row windows); the server answers 504."""


MAX_BANDS = 64  # bands a raster may have at all (HNDSR_MAX_BANDS): every band of a block is decoded to read one
MAX_BYTES_PER_PIXEL = 128  # all bands' bytes per pixel (HNDSR_MAX_BYTES_PER_PIXEL): e.g. 16 float64 bands


@dataclass(frozen=True)
class Header:
    height: int
    width: int


def inspect(data: bytes, max_pixels: int, *, max_bands: int = MAX_BANDS,
            max_bytes_per_pixel: int = MAX_BYTES_PER_PIXEL) -> Header | None:
    """The size of an upload from its header alone, checked against the limits before anything is decoded
    (ImageTooLarge for pixels or bytes per pixel, raster.TooManyBands); None when the header cannot be read
    (`decode` then says why)."""
    if not is_tiff(data):
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - decode_rgb reports what is wrong with it
            return None
        if width * height > max_pixels:
            raise ImageTooLarge(f"too many pixels: {width}x{height} is above the limit of {max_pixels}")
        return Header(height, width)
    try:
        with raster.open_raster(data) as dataset:
            _check_raster(dataset, max_pixels, max_bands, max_bytes_per_pixel)
            return Header(dataset.height, dataset.width)
    except raster.RasterError as exc:
        if isinstance(exc, raster.TooManyBands):
            raise
        return None


def _check_raster(dataset, max_pixels: int, max_bands: int, max_bytes_per_pixel: int) -> None:
    if dataset.width * dataset.height > max_pixels:
        raise ImageTooLarge(f"too many pixels: {dataset.width}x{dataset.height} is above the limit of {max_pixels}")
    if dataset.count > max_bands:
        raise raster.TooManyBands(f"the raster has {dataset.count} bands, above this server's limit of {max_bands} "
                                  "(reading a few means decoding every band of each block); extract the bands the "
                                  "model takes first, e.g. gdal_translate -b 1 -b 2 -b 3")
    per_pixel = sum(np.dtype(t).itemsize for t in dataset.dtypes)
    if per_pixel > max_bytes_per_pixel:
        raise ImageTooLarge(f"too many bytes per pixel: {dataset.count} bands of {'/'.join(sorted(set(dataset.dtypes)))} "
                            f"are {per_pixel} bytes per pixel, above the limit of {max_bytes_per_pixel}; extract the "
                            "bands the model takes first, e.g. gdal_translate -b 1 -b 2 -b 3")


def decode(data: bytes, spec: DataSpec, bands: list[int] | None, max_pixels: int, *, max_bands: int = MAX_BANDS,
           max_bytes_per_pixel: int = MAX_BYTES_PER_PIXEL, deadline: float | None = None) -> Decoded:
    """Model values of an upload; ImageDecodeError (RasterError for rasters) saying what is wrong. A raster is
    read window by window, only the chosen bands; `deadline` (time.monotonic()) is checked between windows
    (DecodeTimeout)."""
    if not is_tiff(data):
        if bands is not None:
            raise raster.BandMismatch("`bands` chooses bands of a TIFF raster; this image is a PNG or JPEG, which is "
                                      "always read as RGB: leave `bands` out, or send the raster as TIFF")
        pixels = decode_rgb(data, max_pixels=max_pixels)
        if spec.channels != 3:
            raise raster.BandMismatch(f"the model expects {spec.describe()}; PNG and JPEG images are RGB: send a "
                                      f"{spec.channels}-band TIFF")
        return Decoded(spec.image_to_model(pixels), None, "uint8")

    def in_time() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DecodeTimeout("decoding the upload passed the request's deadline")

    with raster.open_raster(data) as dataset:
        _check_raster(dataset, max_pixels, max_bands, max_bytes_per_pixel)
        try:
            crs = dataset.crs
        except raster.crs_error() as exc:
            raise raster.BadGeoreference(f"unreadable coordinate reference system ({exc}); fix or remove it") \
                from None
        indexes = raster.data_bands(dataset, bands, spec)
        values, valid = raster.read_rows(dataset, indexes, check=in_time)
        raster.check_range(values, valid, spec, dataset.dtypes[0], indexes)
        georeferenced = crs is not None or not dataset.transform.is_identity
        return Decoded(raster.model_input(values, valid, spec), None if valid.all() else valid,
                       dataset.dtypes[0], nodata=dataset.nodata,
                       has_mask=dataset.nodata is None and raster.has_mask(dataset), crs=crs,
                       transform=dataset.transform if georeferenced else None,
                       interps=[dataset.colorinterp[i - 1] for i in indexes],
                       descriptions=[dataset.descriptions[i - 1] for i in indexes], tags=dataset.tags())


def encode(output: np.ndarray, decoded: Decoded, spec: DataSpec, scale: float, fmt: str, *,
           png_compress_level: int, tags: dict[str, str]) -> bytes:
    """The answer's bytes: nodata kept (the input mask upscaled), stored values in the input's data type."""
    height, width = output.shape[:2]
    valid = (raster.upscale_mask(decoded.valid, (0, 0), (0, height), (0, width), (scale, scale))
             if decoded.valid is not None else np.ones((height, width), dtype=bool))
    stored = raster.stored_output(output, valid, spec, decoded.dtype, decoded.nodata)
    if fmt == "png":
        return encode_png(np.ascontiguousarray(stored.transpose(1, 2, 0)), png_compress_level)
    transform = raster.refined_transform(decoded.transform, scale) if decoded.transform is not None else None
    profile = raster.output_profile(decoded.dtype, stored.shape[0], width, height, crs=decoded.crs,
                                    transform=transform, nodata=decoded.nodata)
    return raster.encode_geotiff(stored, profile, mask=valid if decoded.has_mask else None,
                                 interps=decoded.interps, descriptions=decoded.descriptions,
                                 tags={**(decoded.tags or {}), **tags})

