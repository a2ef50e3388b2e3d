"""The training stages (`hndsr train autoencoder|operator|diffusion`): thin entry points.

Each reads `train` + `train_<stage>` from params.yaml, loads the frozen upstream checkpoints (refusing
missing or stale ones), runs an Optuna study whose trials are nested MLflow runs, and writes the best
trial's checkpoint to `models/<stage>/` (config.json + model.safetensors + metrics.json), its metrics to
`metrics/<stage>.json` (DVC metrics) and its validation curve to `metrics/<stage>_curve.csv` (DVC plots).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from hndsr.atomic import atomic_directory, atomic_write_bytes
from hndsr.checkpoint import UPSTREAM, load_network, save_network, upstream_hashes
from hndsr.checkpoint import check_upstream as check_lineage
from hndsr.model import HNDSR
from hndsr.params import load_common, params_hash
from hndsr.scheduler import DDIMConfig, DDIMScheduler
from hndsr.splits import data_spec, dataset_hash, load_hr_tiles, load_pairs
from training import tracking
from training.config import load_stage
from training.runtime import setup_runtime
from training.study import create_study, log_study_plots, run_study
from training.trainers import TRAINERS, Context, choose_sampling

log = logging.getLogger("hndsr.train")


def _load_upstream(stage: str, models_dir: Path) -> dict:
    networks = {}
    for upstream in UPSTREAM[stage]:
        network, meta = load_network(models_dir / upstream, upstream)
        check_lineage(meta, upstream, models_dir)
        networks[upstream] = network
    return networks


TIMING_KEYS = {"samples_per_s"}  # vary run to run: MLflow has them, the DVC-tracked curve must not


def _curve_csv(history: list[dict]) -> bytes:
    buffer = io.StringIO()
    fields = [k for k in history[0] if k not in TIMING_KEYS]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue().encode()


def run_stage(stage: str, params_path: str) -> dict:
    """Train `stage` as params.yaml says; return the metrics written to metrics/<stage>.json."""
    start = time.perf_counter()
    common = load_common(params_path)
    params, extras = load_stage(params_path, stage)
    device, amp = setup_runtime(common)
    models_dir, metrics_dir = Path(common.models_dir), Path(common.metrics_dir)
    upstream = _load_upstream(stage, models_dir)
    data_hash = dataset_hash(common.data_dir)
    scale_range = (common.scale_range[0], common.scale_range[1])
    ctx = Context(train_tiles=load_hr_tiles(common.data_dir, "train"),
                  val=load_pairs(common.data_dir, "val", limit=common.val_tiles), scale_range=scale_range,
                  device=device, amp=amp, autoencoder=upstream.get("autoencoder"),
                  operator=upstream.get("operator"), extras=extras)
    tags = {"dataset_hash": data_hash, "params_hash": params_hash(common, params, extras), "device": device.type,
            "precision": "bf16-autocast" if amp else "fp32"}
    log.info("stage %s: %d train tiles, %d val scales, device %s (%s)", stage, len(ctx.train_tiles),
             len(ctx.val), device.type, tags["precision"])
    run_params = {"train": asdict(common), f"train_{stage}": asdict(params)}
    with tracking.stage_run(stage, experiment=common.experiment, tags=tags, params=run_params) as run_id:
        study = create_study(stage, params, common.study_storage, run_id)
        train = partial(_trial, TRAINERS[stage], params, ctx)
        best = run_study(stage, params, study, train, tags)
        metrics = {"objective": best.score, **best.metrics,
                   "trials_complete": sum(t.state.name == "COMPLETE" for t in study.trials),
                   "trials_failed": sum(t.state.name == "FAIL" for t in study.trials),
                   "trials_pruned": sum(t.state.name == "PRUNED" for t in study.trials)}
        extra = {"upstream": upstream_hashes(stage, models_dir), "scale_range": list(scale_range),
                 "run_id": run_id, "dataset_hash": data_hash, "best_params": study.best_params,
                 "study": study.study_name}
        if stage == "autoencoder":  # the pixel interface: the bands and radiometry of the training data
            extra["data"] = data_spec(common.data_dir).to_config()  # recorded by the ETL in the manifest
        if stage == "diffusion":
            model = HNDSR(ctx.autoencoder, ctx.operator, best.network,
                          DDIMScheduler(DDIMConfig(extras.num_train_timesteps, extras.prediction_type)),
                          min_scale=scale_range[0], max_scale=scale_range[1], data=data_spec(common.data_dir))
            sampling, table = choose_sampling(model, ctx, extras)
            extra.update(sampling=asdict(sampling), scheduler=asdict(model.scheduler.config), sampling_table=table)
            metrics.update(default_steps=sampling.steps, default_temperature=sampling.temperature,
                           default_strength=sampling.strength)
            chosen = next(r for r in table if (r["steps"], r["temperature"], r["strength"])
                          == (sampling.steps, sampling.temperature, sampling.strength))
            metrics.update(val_psnr_cost=chosen["max_psnr_cost"], val_detail_ratio=chosen["detail_ratio"])
        tracking.log_metrics({f"best_{k}": v for k, v in metrics.items()})
        tracking.log_params({f"best.{k}": v for k, v in study.best_params.items()})
        log_study_plots(study)
        with atomic_directory(models_dir / stage) as staging:
            save_network(staging, stage, best.network.cpu(), extra=extra)
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        metrics_json = json.dumps(metrics, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write_bytes(metrics_dir / f"{stage}.json", metrics_json)
        atomic_write_bytes(metrics_dir / f"{stage}_curve.csv", _curve_csv(best.history))
        tracking.log_artifact(metrics_dir / f"{stage}_curve.csv")
    print(f"train {stage}: best objective {best.score:.4f} ({metrics['trials_complete']} complete, "
          f"{metrics['trials_failed']} failed, {metrics['trials_pruned']} pruned of {params.n_trials}); "
          f"{json.dumps({k: round(v, 4) for k, v in best.metrics.items()})}; run {run_id}; "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return metrics


def _trial(trainer, params, ctx, hp, report, seed):
    return trainer(params, hp, ctx, report, seed)
