"""The MLflow pyfunc flavour of a registered HNDSR version, logged as *model from code*: MLflow stores this
file, not a pickled object, and `load_context` rebuilds the model from the version's `checkpoints` artifact
(three safetensors + config.json folders) with `hndsr.checkpoint.load_model`.

Input: one row per image, columns
    image  string  base64 of a PNG or JPEG (8-bit RGB, hndsr.images) or a TIFF/GeoTIFF (any data type and band
                   count the model takes: its radiometry, nodata and georeference, hndsr.raster)
    scale  double  in the model's trained range
    steps  long    optional; DDIM steps, 0 = prior only, missing or negative = the model's default
    seed   long    optional; default 0 (same input, scale, steps and seed: same output)
Output: one row per image, columns `image` (base64: PNG for 8-bit RGB input, else a GeoTIFF with the input's data
type, bands, nodata and the refined georeference; decoded and encoded by hndsr.imagefile, as the server does),
`height`, `width`.

This is what `mlflow models serve -m models:/hndsr@production` serves; the FastAPI server (`serving/`)
loads the same checkpoints directly.
"""

from __future__ import annotations

import base64
import math

import mlflow.pyfunc
from mlflow.models import set_model

MAX_INPUT_PIXELS = 4_000_000  # per input image; larger inputs belong to the tiling server (`hndsr serve`)


class HNDSRPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from hndsr.checkpoint import load_model

        # On the GPU where there is one (float32, whole image: the model as trained); the noise is drawn on the
        # CPU either way, so the seed gives the same image on both up to float rounding.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(context.artifacts["checkpoints"]).to(self.device)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from hndsr import imagefile

        spec = self.model.data
        rows = []
        for row in model_input.to_dict(orient="records"):
            decoded = imagefile.decode(base64.b64decode(row["image"]), spec, None, MAX_INPUT_PIXELS)
            lr = torch.from_numpy(decoded.lr).permute(2, 0, 1)[None].to(self.device)
            scale = float(row["scale"])
            steps = _optional_int(row.get("steps"))
            with torch.inference_mode():
                output = self.model.super_resolve(lr, scale, steps=None if steps is None or steps < 0 else steps,
                                                  seed=_optional_int(row.get("seed")) or 0)
            pixels = output[0].permute(1, 2, 0).float().cpu().numpy()
            fmt = "png" if decoded.is_png_compatible else "tiff"
            data = imagefile.encode(pixels, decoded, spec, scale, fmt, png_compress_level=6, tags={})
            rows.append({"image": base64.b64encode(data).decode("ascii"),
                         "height": int(pixels.shape[0]), "width": int(pixels.shape[1])})
        return pd.DataFrame(rows, columns=["image", "height", "width"])


def _optional_int(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


set_model(HNDSRPyfunc())
