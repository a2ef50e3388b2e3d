"""The `evaluate` stage: the test split, at every scale it holds, for HNDSR (default DDIM steps), its prior
alone (steps = 0) and bicubic upsampling.

Writes `metrics/eval.json`:

    {"scales": {"4": {"psnr", "ssim", "ms_ssim", "gmsd", "detail_ratio", "hf_share", each also as prior_* and
                      bicubic_*, "hr_hf_share", "consistency_nrmse", "spectral_angle_deg", "shift_px", "tiles"},
                ...},
     "steps", "temperature", "seed", "dataset_hash", "models": {stage: weights sha256}}

With `evaluate.self_ensemble` every scale also has ensemble_psnr, ensemble_ssim and ensemble_detail_ratio (the
8-transform geometric self-ensemble), and the command prints its gain and its cost per tile.

`detail_ratio` is the output's high-frequency energy over the HR's (hndsr.metrics): 1 is the HR's texture,
below 1 smoother. `ms_ssim` (structure across 4 scales, higher is better) and `gmsd` (gradient similarity
deviation, lower is better) are the full-reference perceptual figures, `hf_share` the no-reference one (share of
spectral power above half Nyquist; the HR's own is `hr_hf_share`): hndsr.metrics says why each suits aerial
imagery. The command prints what the diffusion steps buy against steps = 0 (the prior) in each; where the
default is steps = 0, it also scores the validated setting with steps as `diffusion_*` for that comparison. `consistency_nrmse`, `spectral_angle_deg` and `shift_px` compare HNDSR's output, shrunk back
by the degradation function, with its own LR (hndsr.consistency; the gate bounds them). The same figures go to an MLflow run (`test_psnr_x4`, ...) with a sample grid image
(LR | bicubic | prior | HNDSR | HR) for the test tiles with the most detail, also written to
`reports/eval_grid.png`.

It also writes the model's monitoring reference, `models/reference.json` (hndsr.monitoring): the ETL's input
histograms of the training split and the consistency figure's distribution on the validation split, with the
weight hashes it belongs to; it is registered with the version, and the server compares live traffic with it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from hndsr import monitoring
from hndsr.atomic import atomic_write_bytes
from hndsr.checkpoint import STAGES, load_model, read_config, weights_hash
from hndsr.evaluation import score
from hndsr.images import encode_png, to_uint8
from hndsr.metrics import high_frequency_energy
from hndsr.model import bicubic_upsample
from hndsr.params import load_common, load_evaluate, params_hash
from hndsr.splits import DataError, dataset_hash, load_pairs
from training import tracking
from training.runtime import setup_runtime

log = logging.getLogger("hndsr.evaluate")


def evaluate(params_path: str, report_dir: str = "reports") -> dict:
    start = time.perf_counter()
    common, eparams = load_common(params_path), load_evaluate(params_path)
    device, _ = setup_runtime(common)
    model = load_model(common.models_dir).to(device)
    steps = model.defaults.steps if eparams.steps is None else eparams.steps
    # With steps = 0 (the diffusion stage found that steps buy nothing measurable on validation), the test split
    # still shows what they would buy: the validated setting with steps, scored as diffusion_*.
    diffusion_steps = None if steps else _validated_steps(Path(common.models_dir))
    test = load_pairs(common.data_dir, "test")
    timings: dict[str, float] = {}
    results = score(model, test, steps=steps, seed=eparams.seed, batch_size=eparams.batch_size, device=device,
                    ensemble=eparams.self_ensemble, timings=timings, diffusion_steps=diffusion_steps)
    grid_rows = [_grid_rows(model, pairs, scale, steps, eparams, device) for scale, pairs in test.items()]
    report = {
        "scales": results,
        "steps": steps,
        "temperature": model.defaults.temperature,
        "seed": eparams.seed,
        "dataset_hash": dataset_hash(common.data_dir),
        "models": {stage: weights_hash(Path(common.models_dir) / stage) for stage in STAGES},
    }
    reference = monitoring_reference(model, common.data_dir, steps=steps, seed=eparams.seed,
                                     batch_size=eparams.batch_size, device=device)
    reference.update(dataset_hash=report["dataset_hash"], models=report["models"])
    atomic_write_bytes(Path(common.models_dir) / monitoring.REFERENCE_FILE,
                       json.dumps(reference, indent=1, sort_keys=True).encode() + b"\n")
    grid_path = Path(report_dir) / "eval_grid.png"
    atomic_write_bytes(grid_path, encode_png(np.concatenate(grid_rows, axis=0)))
    atomic_write_bytes(Path(common.metrics_dir) / "eval.json", json.dumps(report, indent=2, sort_keys=True).encode() + b"\n")
    tags = {"dataset_hash": report["dataset_hash"], "params_hash": params_hash(common, eparams),
            **{f"{stage}_weights": digest for stage, digest in report["models"].items()}}
    with tracking.stage_run("evaluate", experiment=common.experiment, tags=tags,
                            params={"steps": steps, "seed": eparams.seed}):
        for scale, values in results.items():
            tracking.log_metrics({f"test_{k}_x{scale}": v for k, v in values.items() if k != "tiles"})
        tracking.log_artifact(grid_path)
        tracking.log_artifact(Path(common.metrics_dir) / "eval.json")
    gains = ", ".join(f"x{s} {v['psnr'] - v['bicubic_psnr']:+.2f} dB" for s, v in results.items())
    print(f"evaluate: HNDSR vs bicubic PSNR on test: {gains} (steps {steps}); "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    with_steps = "" if steps else "diffusion_"
    if steps or diffusion_steps:
        print(f"evaluate: what {steps or diffusion_steps} DDIM steps{'' if steps else ' (not the default)'} buy "
              "against steps = 0 (the prior) on test: " + "; ".join(
                  f"x{s} PSNR {v[with_steps + 'psnr'] - v['prior_psnr']:+.3f} dB, MS-SSIM "
                  f"{v[with_steps + 'ms_ssim'] - v['prior_ms_ssim']:+.4f}, GMSD "
                  f"{v[with_steps + 'gmsd'] - v['prior_gmsd']:+.4f}, HF share {v['prior_hf_share']:.3f} -> "
                  f"{v[with_steps + 'hf_share']:.3f} (HR {v['hr_hf_share']:.3f})" for s, v in results.items()),
              flush=True)
    if eparams.self_ensemble:
        tiles = sum(len(p.tile_ids) for p in test.values())
        ensemble = ", ".join(f"x{s} {v['ensemble_psnr'] - v['bicubic_psnr']:+.2f} dB" for s, v in results.items())
        print(f"evaluate: self-ensemble (8 passes) vs bicubic: {ensemble}; it costs "
              f"{timings['ensemble'] / tiles:.3f} s per tile against {timings['plain'] / tiles:.3f} s "
              f"(x{timings['ensemble'] / timings['plain']:.1f})", flush=True)
    return report


def monitoring_reference(model, data_dir: str | Path, *, steps: int, seed: int, batch_size: int, device) -> dict:
    """The model's monitoring reference (hndsr.monitoring): the ETL's input histograms of the training split and
    the distribution of the consistency figure on the validation split (every scale, the model's default steps)."""
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    if not manifest.get("reference"):
        raise DataError(f"{data_dir}/manifest.json has no input reference (written by the etl stage since format "
                        "1 of hndsr.monitoring): re-run `dvc repro etl`")
    try:
        validation = load_pairs(data_dir, "val")
    except DataError:  # a dataset without a validation split: the input reference alone
        validation = {}
    psnrs, shifts = [], []
    for scale, pairs in validation.items():
        for i in range(0, len(pairs.tile_ids), batch_size):
            lr = pairs.lr[i : i + batch_size]
            with torch.inference_mode():
                output = model.super_resolve(lr.to(device), scale, steps=steps, seed=seed + i).float().cpu()
            for out, given in zip(output.permute(0, 2, 3, 1).numpy(), lr.permute(0, 2, 3, 1).numpy(), strict=True):
                psnr_db, shift = monitoring.consistency(out, given, None, scale)
                if psnr_db is not None:
                    psnrs.append(psnr_db)
                if shift is not None:
                    shifts.append(shift)
    tiles = sum(len(p.tile_ids) for p in validation.values())
    consistency = {
        "psnr_db": monitoring.distribution(psnrs, monitoring.CONSISTENCY_EDGES),
        "shift_px": {k: (round(float(v), 4) if shifts else None)
                     for k, v in zip(("p50", "p95"), np.percentile(shifts, [50, 95]) if shifts else (0, 0),
                                     strict=True)},
        "computed_on": f"validation split: {tiles} tiles over {len(validation)} scales, steps {steps}, seed {seed}",
    } if psnrs else None
    return {"format_version": monitoring.FORMAT_VERSION, "input": manifest["reference"], "consistency": consistency}


def _validated_steps(models_dir: Path) -> int | None:
    """The steps of the best setting with steps in the diffusion stage's validation table (lowest GMSD), if any."""
    table = read_config(models_dir / "diffusion", "diffusion").get("sampling_table") or []
    rows = [r for r in table if r.get("steps") and r.get("gmsd") is not None]
    return min(rows, key=lambda r: r["gmsd"])["steps"] if rows else None


def _grid_rows(model, pairs, scale, steps, eparams, device) -> np.ndarray:
    """Sample grid rows for the `grid_tiles` test tiles with the most HR detail (where super-resolution
    matters; the flattest tiles would all look alike): LR (nearest) | bicubic | prior | HNDSR | HR."""
    hr = pairs.hr.to(device)
    chosen = high_frequency_energy(hr).argsort(descending=True)[: eparams.grid_tiles].sort().values
    lr, hr = pairs.lr.to(device)[chosen], hr[chosen]
    size = hr.shape[-2:]
    columns = [torch.nn.functional.interpolate(lr, size=size, mode="nearest"), bicubic_upsample(lr, size),
               model.super_resolve(lr, scale, steps=0, size=size),
               model.super_resolve(lr, scale, steps=steps, seed=eparams.seed, size=size), hr]
    rgb = model.data.display_bands()  # the picture shows red, green and blue of any band set
    rows = [np.concatenate([to_uint8(c[i : i + 1, rgb])[0] for c in columns], axis=1) for i in range(len(chosen))]
    return np.concatenate(rows, axis=0)
