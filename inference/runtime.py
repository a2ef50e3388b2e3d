"""Loading the model and starting the engine from settings: the one start-up shared by `hndsr serve` and
`hndsr predict`, so both run the same model checks, pass budget, batch size and workers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from hndsr.degradation import hr_size
from inference import acceleration, loader
from inference.engine import Engine, LoadedModel, smallest_tile
from inference.settings import EngineSettings

log = logging.getLogger("hndsr.inference")


def load_options(settings: EngineSettings, max_batch: int) -> dict:
    """How loader.load checks a model's cheaper arithmetic (the batch size warms a compiled graph)."""
    return {"precision": settings.precision, "compile": settings.compile, "min_psnr_db": settings.min_psnr_db,
            "max_batch": max_batch}


def check_budget(loaded: LoadedModel, pass_pixels: int, overlap: int) -> None:
    """ModelLoadError unless the pass budget holds the smallest tile at the model's largest scale (so every
    request the model accepts has a tile plan)."""
    scale = loaded.model.max_scale
    smallest = hr_size(smallest_tile(overlap), scale) ** 2
    if smallest > pass_pixels:
        raise loader.ModelLoadError(
            f"HNDSR_PASS_MEGAPIXELS={pass_pixels / 1e6:g} is too small for this model: the smallest tile at its "
            f"largest scale (x{scale:g}) has {smallest / 1e6:.3f} output megapixels")


def start(settings: EngineSettings, *, on_batch: Callable[[int], None] | None = None,
          calibrate: bool = True) -> tuple[LoadedModel, Engine]:
    """Load settings.model_uri on settings.device (checked and warmed), size the engine and start it; `calibrate`:
    measure the model's speed on it (Engine.calibrate), which the server's admission needs.
    Raises loader.ModelLoadError with the reason when the model cannot be loaded or does not fit the budget."""
    device = loader.pick_device(settings.device)
    max_batch = acceleration.default_max_batch(settings.max_batch, device)
    model = loader.load(settings.model_uri, device, **load_options(settings, max_batch))
    budget = acceleration.pass_megapixels(settings.pass_megapixels, model.model, device, model.acceleration)
    pass_pixels = int(budget * 1e6)
    check_budget(model, pass_pixels, settings.tile_overlap)
    workers = acceleration.default_workers(settings.workers, device)
    engine = Engine(device, pass_pixels=pass_pixels, overlap=settings.tile_overlap, max_batch=max_batch,
                    workers=workers, max_queue_pixels=settings.max_queue_pixels,
                    self_ensemble=settings.self_ensemble, on_batch=on_batch)
    if calibrate:  # the server refuses what could not finish by its deadline; batch prediction has none
        engine.calibrate(model)
        model.info["speed"] = model.speed.to_dict()
    log.info("engine on %s: passes of up to %.2f output megapixels (an image whose output fits is one tile), "
             "up to %d tiles per pass, %d passes in flight, tile overlap %d px%s", device, budget, max_batch,
             workers, settings.tile_overlap,
             ", self-ensemble on (8 passes per tile: 8x the time)" if settings.self_ensemble else "")
    return model, engine
