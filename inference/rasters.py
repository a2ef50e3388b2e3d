"""What the server does with an uploaded image around the engine: decode it to model values and encode the result
(hndsr.imagefile, shared with the registered pyfunc flavour), in the format the client asked for.

Output format: the `format` form field (`png` or `tiff`), else `Accept: image/tiff`, else PNG for 8-bit RGB and
GeoTIFF for anything else (PNG carries 8-bit RGB only). A GeoTIFF answer has the input's CRS, its transform with
the pixel size divided by the scale, its data type, bands and nodata.
"""

from __future__ import annotations

from hndsr import raster
from hndsr.imagefile import Decoded

FORMATS = {"png": "image/png", "tiff": "image/tiff"}


def choose_format(requested: str | None, accept: str, decoded: Decoded) -> str:
    """`png` or `tiff` (see the module doc); RasterError when PNG is asked for what it cannot carry."""
    fmt = requested or ("tiff" if "image/tiff" in accept.lower() else None)
    if fmt is None:
        return "png" if decoded.is_png_compatible else "tiff"
    if fmt == "png" and not decoded.is_png_compatible:
        raise raster.UnsupportedOutput(f"PNG carries 8-bit RGB only; this is {decoded.lr.shape[2]}-band "
                                       f"{decoded.dtype}: ask for format=tiff")
    return fmt
