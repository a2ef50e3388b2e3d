"""One image file in memory, in and out: an upload's bytes to model values and a result back to bytes. Used by the
server (serving/) and by the registered pyfunc flavour (registry/pyfunc_model.py), so both read and write files
the same way.

TIFF (GeoTIFF or not) goes through rasterio (hndsr.raster: any band count and data type the model takes, nodata,
georeference); PNG and JPEG through hndsr.images (8-bit RGB). A GeoTIFF result has the input's CRS, its transform
with the pixel size divided by the scale, its data type, bands and nodata (the input's mask upscaled).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from hndsr import raster
from hndsr.images import ImageTooLarge, decode_rgb, encode_png
from hndsr.raster import DataSpec

# A TIFF without georeference is a normal input here (it gets a TIFF without one back).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)

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


def decode(data: bytes, spec: DataSpec, bands: list[int] | None, max_pixels: int) -> Decoded:
    """Model values of an upload; ImageDecodeError (RasterError for rasters) saying what is wrong."""
    if not is_tiff(data):
        if bands is not None:
            raise raster.BandMismatch("`bands` chooses bands of a TIFF raster; this image is a PNG or JPEG, which is "
                                      "always read as RGB: leave `bands` out, or send the raster as TIFF")
        pixels = decode_rgb(data, max_pixels=max_pixels)
        if spec.channels != 3:
            raise raster.BandMismatch(f"the model expects {spec.describe()}; PNG and JPEG images are RGB: send a "
                                      f"{spec.channels}-band TIFF")
        return Decoded(spec.image_to_model(pixels), None, "uint8")
    with raster.open_raster(data) as dataset:
        if dataset.width * dataset.height > max_pixels:
            raise ImageTooLarge(f"too many pixels: {dataset.width}x{dataset.height} is above the limit of "
                                f"{max_pixels}")
        try:
            crs = dataset.crs
        except rasterio.errors.CRSError as exc:
            raise raster.BadGeoreference(f"unreadable coordinate reference system ({exc}); fix or remove it") \
                from None
        indexes = raster.data_bands(dataset, bands, spec)
        values, valid = raster.read_window(dataset, indexes)
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

