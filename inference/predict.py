"""`hndsr predict`: super-resolve files and folders with the engine `hndsr serve` runs, scenes window by window.

A raster (GeoTIFF, or any TIFF) is read through rasterio in windows: each core window of the LR scene is read
with a halo of `HALO` LR pixels on every side, run through the engine (which tiles and blends it exactly as
it does a server request), cropped back to the core and written to the output GeoTIFF at its place. Memory
therefore depends on the window size, not on the scene's. Window origins lie on the engine's tile-origin
lattice (`inference.engine.lattice_periods`), so every window's output grid is the scene's own shifted by whole
multiples of the model's 4 px grid (no sub-pixel seams); for a scale with no such period up to `MAX_PERIOD` LR
px, the misplacement is logged and reported.

The output: same CRS, the input's transform with the pixel size divided by the scale (same origin), same data
type and bands, nodata kept (hndsr.raster), written as a Cloud-Optimized GeoTIFF (512 px tiles, deflate,
overviews): the windows go into an uncompressed tiled scratch file beside the target (blocks shared by two
windows are rewritten in place there), which `raster.write_cog` then compresses block by block, each block once.
Free disk beside the target: the output's uncompressed size while it runs. Tags record the model version,
scale, steps, seed and the torch thread count. PNG and JPEG inputs give PNG outputs, as the server does.

Repeatability: the same input, model, options, machine type and torch thread count give the same bytes. Another
thread count (`--workers` N gives each worker its share of the cores) rounds some float sums differently; the
outputs then differ by at most one level in a few values (docs/explanation/reproducibility.md).

Consistency figures, per scene (`<name>.consistency.json`), need no high-resolution truth: the output is
shrunk back with the degradation function (hndsr.degradation) and compared with the input on valid pixels:
RMSE per band in stored units, mean spectral angle in degrees (two or more bands), and the shift between the two
by phase correlation (LR pixels, sub-pixel). With `uncertainty = N` the scene is sampled with N seeds and the
per-pixel standard deviation (stored units, mean over bands) is written as `<name>.uncertainty.tif`.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from tqdm import tqdm

from hndsr import monitoring, raster
from hndsr.consistency import Consistency
from hndsr.degradation import hr_size
from hndsr.images import ImageDecodeError, decode_rgb, encode_png
from hndsr.raster import RasterError
from inference.engine import Engine, LoadedModel, lattice_periods, plan_tiles

log = logging.getLogger("hndsr.predict")

# A TIFF without georeference is a normal input here (it gets a TIFF without one back).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)

HALO = 32  # LR pixels of context read around each window core
MAX_PERIOD = 64
MIN_CORE = 64  # LR pixels: a window's core is never smaller, whatever --window says (halos would dominate)
RASTER_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DEADLINE_S = 7 * 24 * 3600.0  # batch work has no request deadline
MAX_IMAGE_PIXELS = 100_000_000  # PNG/JPEG are decoded whole (they cannot be read by window)


class PredictError(raster.RasterError):
    """An input or option predict cannot use; the message says what to fix."""


@dataclass(frozen=True)
class Options:
    scale: float | None = None
    target_res: float | None = None
    like: Path | None = None
    steps: int | None = None
    seed: int = 0
    bands: list[int] | None = None
    window: int = 2048  # output pixels along a window's edge (memory: about window^2 x bands x 12 bytes)
    uncertainty: int = 0  # seeds for the uncertainty raster; 0: none
    overwrite: bool = False


@dataclass
class Result:
    source: str
    output: str | None = None
    error: str | None = None
    figures: dict = field(default_factory=dict)


def find_inputs(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(file, its output path relative to the output folder) for every file and every image under a folder."""
    found = []
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES | IMAGE_SUFFIXES):
                found.append((file, file.relative_to(path)))
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise PredictError(f"{path}: no such file or folder")
    return found


def predict(paths: list[Path], out_dir: Path, model: LoadedModel, engine: Engine, options: Options) -> list[Result]:
    """Super-resolve every input into `out_dir` in this process; a file that fails is reported and skipped."""
    return [predict_file(source, relative, out_dir, model, engine, options)
            for source, relative in tqdm(find_inputs(paths), desc="predict", unit="file", disable=None)]


def predict_file(source: Path, relative: Path, out_dir: Path, model: LoadedModel, engine: Engine,
                 options: Options) -> Result:
    """One input into `out_dir / relative` (GeoTIFF for rasters, PNG for images); errors come back in the Result."""
    is_raster = source.suffix.lower() in RASTER_SUFFIXES
    target = out_dir / relative.with_suffix(".tif" if is_raster else ".png")
    result = Result(str(source))
    if target.exists() and not options.overwrite:
        result.error = f"{target} exists (use --overwrite to replace it)"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if is_raster:
                result.figures = predict_scene(source, target, model, engine, options)
            else:
                result.figures = predict_image(source, target, model, engine, options)
            result.output = str(target)
        except (RasterError, ImageDecodeError, ValueError) as exc:
            result.error = str(exc)
    if result.error:
        log.error("%s: skipped: %s", source, result.error)
    return result


def predict_on_cluster(paths: list[Path], out_dir: Path, settings, options: Options, cluster) -> list[Result]:
    """`predict` with one task per file on a Dask cluster (hndsr.tasks): each worker process loads the model once
    (from `settings`, as `hndsr serve` would) and writes its outputs itself, so `out_dir` and the inputs must be at
    the same paths on every worker (a shared filesystem; local processes share this machine's). The outputs are
    the bytes `predict` writes in one process."""
    from hndsr import tasks

    found = find_inputs(paths)
    results = []
    for index, outcome in tasks.run(partial(_predict_task, settings, out_dir, options), found, cluster=cluster,
                                    desc="predict", names=[str(source) for source, _ in found]):
        if isinstance(outcome, tasks.Failed):
            outcome = Result(str(found[index][0]), error=outcome.error)
        results.append(outcome)
    return results


_WORKER_MODEL: dict = {}  # in a cluster's worker process: settings -> (model, engine), loaded by its first task


def _predict_task(settings, out_dir: Path, options: Options, item: tuple[Path, Path]) -> Result:
    from inference import runtime

    key = settings.model_dump_json()
    if key not in _WORKER_MODEL:
        for _, engine in _WORKER_MODEL.values():
            engine.close()
        _WORKER_MODEL.clear()
        _WORKER_MODEL[key] = runtime.start(settings, calibrate=False)
    model, engine = _WORKER_MODEL[key]
    return predict_file(item[0], item[1], out_dir, model, engine, options)


def resolve_grid(dataset: rasterio.DatasetReader, model: LoadedModel, options: Options) -> tuple[float, Affine]:
    """The scale and output transform from --scale, --target-res (input pixel size / target) or --like (the
    reference raster's grid), inside the model's range. The transform keeps the input's origin (--like: the same
    point, which must lie on the reference grid) with the pixel size divided by the scale."""
    given = [o for o in (options.scale, options.target_res, options.like) if o is not None]
    if len(given) != 1:
        raise PredictError("give exactly one of --scale, --target-res and --like")
    name = Path(dataset.name).name
    in_x = raster.pixel_size(dataset.transform)[0]
    if options.scale is None and dataset.crs is None:
        raise PredictError(f"{name}: --target-res and --like need a georeferenced raster (this one has no CRS); "
                           "use --scale")
    if options.like is not None:
        scale, transform = _like(dataset, options.like)
        what = f"--like {options.like.name}"
    elif options.target_res is not None:
        if not options.target_res > 0:
            raise PredictError(f"--target-res must be a positive pixel size, got {options.target_res}")
        scale = in_x / options.target_res
        transform = raster.refined_transform(dataset.transform, scale)
        what = f"--target-res {options.target_res:g} on {in_x:g} pixels"
    else:
        scale = float(options.scale)
        transform = raster.refined_transform(dataset.transform, scale)
        what = f"--scale {options.scale:g}"
    low, high = model.model.min_scale, model.model.max_scale
    if not low - 1e-9 <= scale <= high + 1e-9:
        raise PredictError(f"{what} means scale {scale:.4g}, outside the model's range [{low:g}, {high:g}]")
    return scale, transform


def _like(dataset: rasterio.DatasetReader, reference: Path) -> tuple[float, Affine]:
    """Scale and transform that put the output on `reference`'s grid: same CRS, north-up, the same pixel-size
    ratio on both axes, and the input's origin on a reference pixel corner (within 1 % of a pixel; otherwise the
    input must be resampled onto the grid first, which this command does not do)."""
    name = Path(dataset.name).name
    with raster.open_raster(reference) as ref:
        ref_crs, ref_t = ref.crs, ref.transform
    src_t = dataset.transform
    if ref_crs != dataset.crs:
        raise PredictError(f"--like {reference.name} is in {ref_crs}, {name} in {dataset.crs}: reproject one first")
    if src_t.b or src_t.d or ref_t.b or ref_t.d:
        raise PredictError(f"--like needs north-up rasters (no rotation); {name} or {reference.name} is rotated")
    scale_x, scale_y = src_t.a / ref_t.a, src_t.e / ref_t.e
    if abs(scale_x - scale_y) > 1e-6 * scale_x:
        raise PredictError(f"{reference.name}'s pixels are {scale_x:.6g} times smaller than {name}'s across but "
                           f"{scale_y:.6g} times down; the model needs one scale")
    offset_x, offset_y = (src_t.c - ref_t.c) / ref_t.a, (src_t.f - ref_t.f) / ref_t.e
    off = max(abs(offset_x - round(offset_x)), abs(offset_y - round(offset_y)))
    if off > 0.01:
        raise PredictError(f"{name}'s origin is {off:.3f} of a {reference.name} pixel off its grid: resample it onto "
                           "that grid first (e.g. gdalwarp -tap), or use --target-res")
    origin = (ref_t.c + round(offset_x) * ref_t.a, ref_t.f + round(offset_y) * ref_t.e)
    return scale_x, Affine(ref_t.a, 0.0, origin[0], 0.0, ref_t.e, origin[1])


def lattice_period(scale: float) -> tuple[int, float]:
    """The window-origin period (the engine's tile-origin lattice, up to MAX_PERIOD LR px) and how far, in output
    pixels, a window may sit off the scene's grid with it (0 unless no period makes the scale whole)."""
    period = lattice_periods(scale, MAX_PERIOD)[0]
    return period, round(abs(period * scale - round(period * scale)), 6)


def window_core(scale: float, period: int, halo: int, window: int) -> int:
    """LR edge of a window's core: a multiple of `period`, at least MIN_CORE, its read window (core + 2 halos)
    within `window` output px; preferably with `core * scale` a multiple of the output's block edge, so rows of
    windows end on block rows and GDAL never holds more than one row of part-written blocks (its cache would
    otherwise have to hold them across the scene's whole width)."""
    largest = max(MIN_CORE // period * period or period, int((window / scale - 2 * halo) // period) * period)
    for core in range(largest, MIN_CORE - 1, -period):
        output = core * scale
        if abs(output - round(output)) < 1e-6 and round(output) % raster.BLOCK == 0:
            return core
    return largest


def _windows(length: int, core: int) -> list[tuple[int, int]]:
    return [(start, min(start + core, length)) for start in range(0, length, core)]


def predict_scene(source: Path, target: Path, model: LoadedModel, engine: Engine, options: Options) -> dict:
    spec = model.model.data
    steps = model.model.defaults.steps if options.steps is None else options.steps
    start = time.perf_counter()
    with raster.open_raster(source) as src:
        try:
            crs = src.crs
        except rasterio.errors.CRSError as exc:
            raise PredictError(f"{source}: unreadable georeference ({exc})") from None
        indexes = raster.data_bands(src, options.bands, spec, option="--bands")
        raster.check_scene_range(src, indexes, spec)
        scale, transform = resolve_grid(src, model, options)
        period, misplacement = lattice_period(scale)
        if misplacement:
            log.warning("%s: no window period makes x%.6g whole; windows may be misplaced by up to %.3f output px",
                        source, scale, misplacement)
        height, width = src.height, src.width
        out_h, out_w = hr_size(height, scale), hr_size(width, scale)
        halo = math.ceil(HALO / period) * period
        core = window_core(scale, period, halo, options.window)
        dtype, nodata = src.dtypes[0], src.nodata
        with_mask = nodata is None and raster.has_mask(src)
        profile = raster.output_profile(dtype, len(indexes), out_w, out_h, crs=crs,
                                        transform=transform, nodata=nodata)
        windows = [(y, x) for y in _windows(height, core) for x in _windows(width, core)]
        tiles_per_window = [len(plan_tiles(min(y[1] + halo, height) - max(y[0] - halo, 0),
                                           min(x[1] + halo, width) - max(x[0] - halo, 0), scale,
                                           engine.pass_pixels, engine.overlap)) for y, x in windows]
        seeds = [options.seed + k for k in range(max(1, options.uncertainty))]
        figures = Consistency(spec, dtype, len(indexes))
        watch, windows_watched = monitoring.Accumulator(), []  # the server's label-free figures, per window
        unc_target = target.with_name(f"{target.stem}.uncertainty.tif")
        work, work_unc = (path.with_name(f".{path.name}.work") for path in (target, unc_target))
        tmp, tmp_unc = (path.with_name(f".{path.name}.partial") for path in (target, unc_target))
        threads = torch.get_num_threads()
        tags = {"HNDSR_MODEL_VERSION": str(model.info.get("version")), "HNDSR_MODEL_SOURCE": str(model.info.get("source")),
                "HNDSR_SCALE": f"{scale:.10g}", "HNDSR_STEPS": str(steps), "HNDSR_SEED": str(options.seed),
                "HNDSR_SOURCE": source.name, "HNDSR_THREADS": str(threads)}
        log.info("%s: %dx%d x%d %s -> %dx%d at x%.6g, %d windows of <= %d LR px (+%d halo), steps %d",
                 source.name, width, height, len(indexes), dtype, out_w, out_h, scale, len(windows), core, halo,
                 steps)
        try:
            with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True, GDAL_CACHEMAX=raster.GDAL_CACHE_MB), \
                    rasterio.open(work, "w", **raster.working_profile(profile)) as dst, \
                    _uncertainty_file(work_unc, profile, options.uncertainty) as unc, \
                    tqdm(total=sum(tiles_per_window) * len(seeds), unit="tile", desc=source.name,
                         disable=None) as bar:
                raster.copy_band_metadata(src, indexes, dst)
                dst.update_tags(**src.tags(), **tags)
                pending: collections.deque = collections.deque()
                ahead = len(engine.workers) + 1

                def finish() -> None:
                    window, jobs, values, valid, lr = pending.popleft()
                    outputs = [job.future.result() for job in jobs]
                    _write(window, outputs, values, valid, scale, halo, (height, width), (out_h, out_w), spec,
                           dtype, nodata, with_mask, dst, unc, figures)
                    (y0, y1), (x0, x1), _ = window
                    watched = monitoring.assess(lr, None if valid.all() else valid, outputs[0], scale,
                                                model.reference)
                    watch.add(watched, lr.shape[0] * lr.shape[1])
                    windows_watched.append({"window": {"rows": [y0, y1], "cols": [x0, x1]},
                                            **watched.to_dict(model.reference)})
                    bar.update(sum(len(job.tiles) for job in jobs))

                for (y0, y1), (x0, x1) in windows:
                    ry0, ry1, rx0, rx1 = max(y0 - halo, 0), min(y1 + halo, height), max(x0 - halo, 0), min(x1 + halo, width)
                    values, valid = raster.read_window(src, indexes, Window(rx0, ry0, rx1 - rx0, ry1 - ry0))
                    lr = raster.model_input(values, valid, spec)
                    jobs = [engine.submit(model, lr, scale, steps, seed, DEADLINE_S) for seed in seeds]
                    pending.append((((y0, y1), (x0, x1), (ry0, rx0)), jobs, values, valid, lr))
                    while len(pending) >= ahead:
                        finish()
                while pending:
                    finish()
            raster.write_cog(work, tmp)
            if options.uncertainty:
                raster.write_cog(work_unc, tmp_unc)
                os.replace(tmp_unc, unc_target)
            os.replace(tmp, target)
        finally:
            for path in (work, work_unc, tmp, tmp_unc, *(t.with_name(f"{t.name}.ovr.tmp") for t in (tmp, tmp_unc))):
                path.unlink(missing_ok=True)  # (GDAL's COG driver builds overviews in NAME.ovr.tmp)
    seconds = time.perf_counter() - start
    report = {"source": str(source), "output": str(target), "model_version": model.info.get("version"),
              "scale": scale, "steps": steps, "seed": options.seed, "size": [out_w, out_h], "bands": len(indexes),
              "dtype": dtype, "windows": len(windows), "window_misplacement_px": misplacement, "threads": threads,
              "seconds": round(seconds, 3), "output_megapixels_per_s": round(out_h * out_w / 1e6 / seconds, 4),
              "consistency": figures.summary(), "uncertainty_seeds": options.uncertainty or None,
              "monitoring": {**watch.total(model.reference).to_dict(model.reference), "windows": windows_watched,
                             "reference": model.reference.summary() if model.reference is not None else None}}
    target.with_name(f"{target.stem}.consistency.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s -> %s in %.1f s; consistency %s", source.name, target, seconds, json.dumps(report["consistency"]))
    return report


class _uncertainty_file:
    """The uncertainty GeoTIFF (float32, one band, nodata -1) when seeds > 1, else nothing."""

    def __init__(self, path: Path, profile: dict, seeds: int) -> None:
        self.path, self.seeds = path, seeds
        self.profile = raster.working_profile({**profile, "count": 1, "dtype": "float32", "nodata": -1.0,
                                               "photometric": "MINISBLACK"})
        self.dataset = None

    def __enter__(self):
        if self.seeds > 1:
            self.dataset = rasterio.open(self.path, "w", **self.profile)
            self.dataset.set_band_description(1, f"per-pixel std over {self.seeds} seeds, stored units, band mean")
        return self.dataset

    def __exit__(self, *exc) -> None:
        if self.dataset is not None:
            self.dataset.close()


def _write(window, outputs, values, valid, scale, halo, lr_shape, out_shape, spec, dtype, nodata, with_mask, dst,
           unc, figures) -> None:
    (y0, y1), (x0, x1), (ry0, rx0) = window
    rows = (hr_size(y0, scale) if y0 else 0, out_shape[0] if y1 == lr_shape[0] else hr_size(y1, scale))
    cols = (hr_size(x0, scale) if x0 else 0, out_shape[1] if x1 == lr_shape[1] else hr_size(x1, scale))
    oy, ox = hr_size(ry0, scale) if ry0 else 0, hr_size(rx0, scale) if rx0 else 0
    local = (slice(rows[0] - oy, rows[1] - oy), slice(cols[0] - ox, cols[1] - ox))
    core = [output[local] for output in outputs]  # (H, W, C) float model values
    mask = raster.upscale_mask(valid, (ry0, rx0), rows, cols, (scale, scale))
    window_out = Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])
    dst.write(raster.stored_output(core[0], mask, spec, dtype, nodata), window=window_out)
    if with_mask:
        dst.write_mask(mask.astype(np.uint8) * 255, window=window_out)
    if unc is not None:
        spread = np.stack(core).astype(np.float64).std(axis=0)  # (H, W, C) model units; float64: exact 0 for equal
        band_range = spec.band_range(dtype)
        width = np.asarray(band_range.high) - np.asarray(band_range.low)
        stored = (spread * width[None, None, :]).mean(axis=2)
        unc.write(np.where(mask, stored, -1.0).astype(np.float32)[None], window=window_out)
    lr_core = values[:, y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
    figures.add(core[0], lr_core, valid[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0], scale)


def predict_image(source: Path, target: Path, model: LoadedModel, engine: Engine, options: Options) -> dict:
    """A PNG or JPEG: decoded whole by the server's rule (hndsr.images), PNG out; its report (the label-free
    figures, hndsr.monitoring) beside it as NAME.consistency.json."""
    spec = model.model.data
    if spec.channels != 3:
        raise PredictError(f"{source}: the model expects {spec.describe()}; PNG and JPEG images are RGB")
    if options.scale is None:
        raise PredictError(f"{source}: --target-res and --like need a georeferenced raster; use --scale for PNG "
                           "and JPEG")
    scale = float(options.scale)
    low, high = model.model.min_scale, model.model.max_scale
    if not low - 1e-9 <= scale <= high + 1e-9:
        raise PredictError(f"--scale {scale:g} is outside the model's range [{low:g}, {high:g}]")
    steps = model.model.defaults.steps if options.steps is None else options.steps
    pixels = decode_rgb(source.read_bytes(), max_pixels=MAX_IMAGE_PIXELS)
    lr = spec.image_to_model(pixels)
    output = engine.submit(model, lr, scale, steps, options.seed, DEADLINE_S).future.result()
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_bytes(encode_png(spec.image_from_model(output, "uint8")))
    os.replace(tmp, target)
    figures = monitoring.assess(lr, None, output, scale, model.reference).to_dict(model.reference)
    report = {"source": str(source), "output": str(target), "model_version": model.info.get("version"),
              "scale": scale, "steps": steps, "seed": options.seed, "size": [output.shape[1], output.shape[0]],
              "monitoring": {**figures, "reference": model.reference.summary() if model.reference else None}}
    target.with_name(f"{target.stem}.consistency.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s -> %s (x%g, steps %d); consistency %s dB", source.name, target, scale, steps,
             figures["consistency_psnr_db"])
    return report
