"""`hndsr predict`: super-resolve files and folders (PNG, JPEG, TIFF, GeoTIFF) with the engine `hndsr serve` runs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hndsr.cli import Command

log = logging.getLogger("hndsr.predict")


def _bands(text: str) -> list[int]:
    try:
        bands = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1-based band indexes like 1,2,3, got {text!r}") from None
    if not bands:
        raise argparse.ArgumentTypeError("expected at least one band index")
    return bands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Super-resolve images and whole scenes with the model the server runs, through the same engine. "
        "A GeoTIFF gives a Cloud-Optimized GeoTIFF (512 px tiles, deflate, overviews): same CRS and origin, pixel "
        "size divided by the scale, same data type, bands and nodata, read and written window by window (memory "
        "does not grow with the scene; free disk for the uncompressed output is needed while it runs). PNG and "
        "JPEG give PNG. Next to each raster output: NAME.consistency.json (the output shrunk back against the "
        "input: RMSE per band, spectral angle, shift by phase correlation; the torch thread count, on which the "
        "last bits depend). Engine settings (HNDSR_PASS_MEGAPIXELS, HNDSR_WORKERS, HNDSR_DEVICE, ...) are read "
        "from the environment as for `hndsr serve`; OMP_NUM_THREADS sets the threads.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="image files, or folders searched recursively for .tif/.tiff/.png/.jpg/.jpeg")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (a folder input keeps its sub-folders)")
    grid = parser.add_mutually_exclusive_group(required=True)
    grid.add_argument("--scale", type=float, help="scale factor within the model's range, e.g. 4 or 2.5")
    grid.add_argument("--target-res", type=float, metavar="SIZE",
                      help="output pixel size in the raster's CRS units (metres for projected CRSs); the scale "
                           "is the input pixel size divided by it")
    grid.add_argument("--like", type=Path, metavar="REFERENCE",
                      help="put the output on REFERENCE's grid (same CRS, its pixel size, origins on its pixel "
                           "corners): e.g. a 10 m product's grid for a 20 m input")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the model's validated default; 0 = prior)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--self-ensemble", action="store_true",
                        help="average the model over the 8 flips and quarter turns of every tile (geometric "
                             "self-ensemble; about 8x the time; `hndsr evaluate` with evaluate.self_ensemble prints "
                             "what it gains). Same as HNDSR_SELF_ENSEMBLE=1")
    parser.add_argument("--bands", type=_bands, metavar="I,J,...",
                        help="1-based bands to feed the model, in its band order (default: every band but alpha)")
    parser.add_argument("--model", default=None, metavar="URI|DIR",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION or a local folder (default: MODEL_URI, "
                             "else models:/hndsr@production)")
    parser.add_argument("--uncertainty", type=int, default=0, metavar="N",
                        help="also sample N seeds (seed, seed+1, ...) and write NAME.uncertainty.tif, the "
                             "per-pixel spread; costs N times the time (default: off)")
    parser.add_argument("--window", type=int, default=2048, metavar="PX",
                        help="output pixels along a processing window's edge; memory is about PX^2 x bands x "
                             "12 bytes per window in flight (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="one task per file on a local Dask cluster of N worker processes, each loading the "
                             "model once and using cores/N threads (default: %(default)s = in this process)")
    parser.add_argument("--cluster", default=None, metavar="ADDRESS",
                        help="one task per file on the Dask scheduler at ADDRESS, e.g. tcp://host:8786 (default: "
                             "$HNDSR_DASK_ADDRESS when set); inputs and --out must be at the same paths on its workers")


def main(args: argparse.Namespace) -> int:
    from hndsr.tasks import Cluster
    from inference import runtime
    from inference.loader import ModelLoadError
    from inference.predict import Options, PredictError, predict, predict_on_cluster
    from inference.settings import SettingsError
    from inference.settings import load_engine_settings as load_settings

    if args.steps is not None and args.steps < 0:
        raise PredictError(f"--steps must be 0 or more, got {args.steps}")
    if args.uncertainty < 0 or args.uncertainty == 1:
        raise PredictError("--uncertainty needs 2 or more seeds (or 0 for none)")
    if args.window < 64:
        raise PredictError(f"--window must be at least 64 output pixels, got {args.window}")
    try:
        overrides = {"model_uri": args.model} if args.model else {}
        if args.self_ensemble:
            overrides["self_ensemble"] = True
        settings = load_settings(**overrides)
    except SettingsError as exc:
        raise PredictError(str(exc)) from None
    options = Options(scale=args.scale, target_res=args.target_res, like=args.like, steps=args.steps, seed=args.seed,
                      bands=args.bands, window=args.window, uncertainty=args.uncertainty, overwrite=args.overwrite)
    cluster = Cluster(address=args.cluster, workers=args.workers)
    if cluster.distributed:
        log.info("predict: one task per file on %s", cluster.describe())
        results = predict_on_cluster(args.inputs, args.out, settings, options, cluster)
    else:
        try:
            model, engine = runtime.start(settings, calibrate=False)
        except ModelLoadError as exc:
            raise PredictError(f"cannot load the model: {exc}") from None
        try:
            results = predict(args.inputs, args.out, model, engine, options)
        finally:
            engine.close()
    failed = [r for r in results if r.error]
    print(f"predict: {len(results) - len(failed)} written to {args.out}, {len(failed)} failed"
          + "".join(f"\n  {r.source}: {r.error}" for r in failed))
    return 1 if failed or not results else 0


predict = Command("super-resolve files and folders (GeoTIFF in, GeoTIFF out) with the engine `hndsr serve` runs",
                  add_arguments, main)
