"""The MLflow pyfunc flavour of a registered HNDSR version, logged as *model from code*: MLflow stores this
file, not a pickled object, and `load_context` rebuilds the model from the version's `checkpoints` artifact
(three safetensors + config.json folders) with `hndsr.checkpoint.load_model`.

Input: one row per image, columns
    image  string  base64 of a PNG/JPEG/TIFF (8-bit RGB rule of hndsr.images)
    scale  double  in the model's trained range
    steps  long    optional; DDIM steps, 0 = prior only, missing or negative = the model's default
    seed   long    optional; default 0 (same input, scale, steps and seed: same output)
Output: one row per image, columns `image` (base64 PNG), `height`, `width`.

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
        from hndsr.checkpoint import load_model

        self.model = load_model(context.artifacts["checkpoints"])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from hndsr.images import decode_rgb, encode_png, to_tensor, to_uint8

        rows = []
        for row in model_input.to_dict(orient="records"):
            lr = to_tensor(decode_rgb(base64.b64decode(row["image"]), max_pixels=MAX_INPUT_PIXELS))
            steps = _optional_int(row.get("steps"))
            with torch.inference_mode():
                output = self.model.super_resolve(lr, float(row["scale"]),
                                                  steps=None if steps is None or steps < 0 else steps,
                                                  seed=_optional_int(row.get("seed")) or 0)
            pixels = to_uint8(output)[0]
            rows.append({"image": base64.b64encode(encode_png(pixels)).decode("ascii"),
                         "height": int(pixels.shape[0]), "width": int(pixels.shape[1])})
        return pd.DataFrame(rows, columns=["image", "height", "width"])


def _optional_int(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


set_model(HNDSRPyfunc())
