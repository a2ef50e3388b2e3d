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
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from hndsr import provenance
from hndsr.atomic import atomic_directory, atomic_write_bytes
from hndsr.checkpoint import UPSTREAM, load_network, read_config, save_network, upstream_hashes, weights_hash
from hndsr.checkpoint import check_upstream as check_lineage
from hndsr.model import HNDSR
from hndsr.params import TrainCommon, load_common, params_hash
from hndsr.scheduler import DDIMConfig, DDIMScheduler
from hndsr.splits import data_spec, dataset_hash, load_hr_tiles, load_pairs
from training import distributed, tracking
from training.config import DiffusionExtras, StageParams, load_stage
from training.errors import TrainingError
from training.runtime import setup_runtime
from training.study import (
    Sweep,
    find_sweep,
    finish,
    follow,
    log_study_plots,
    open_storage,
    start_sweep,
    storage_url,
    work,
)
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


def _context(common: TrainCommon, extras: DiffusionExtras | None, upstream: dict, device, amp: bool) -> Context:
    return Context(train_tiles=load_hr_tiles(common.data_dir, "train"),
                   val=load_pairs(common.data_dir, "val", limit=common.val_tiles),
                   scale_range=(common.scale_range[0], common.scale_range[1]), device=device, amp=amp,
                   autoencoder=upstream.get("autoencoder"), operator=upstream.get("operator"), extras=extras)


def sweep_hash(common: TrainCommon, params: StageParams, extras: DiffusionExtras | None) -> str:
    """What a trial's result depends on besides data and upstream networks: a worker must have the same."""
    return params_hash(params, extras, {"scale_range": common.scale_range, "val_tiles": common.val_tiles})


def run_stage(stage: str, params_path: str) -> dict:
    """Train `stage` as params.yaml says; return the metrics written to metrics/<stage>.json. Under torchrun only
    rank 0 runs the sweep, logs and writes; the other ranks train their share of each trial (and return {})."""
    start = time.perf_counter()
    common = load_common(params_path)
    params, extras = load_stage(params_path, stage)
    device, amp = setup_runtime(common)
    world = distributed.init(device.type == "cuda")
    try:
        upstream = _load_upstream(stage, Path(common.models_dir))
        ctx = _context(common, extras, upstream, device, amp)
        train = partial(_trial, TRAINERS[stage], params, ctx)
        if not world.main:
            follow(train)
            return {}
        return _coordinate(stage, common, params, extras, ctx, train, start)
    finally:
        distributed.finish()


def _coordinate(stage, common, params, extras, ctx, train, start) -> dict:
    models_dir, metrics_dir = Path(common.models_dir), Path(common.metrics_dir)
    data_hash = dataset_hash(common.data_dir)
    scale_range = ctx.scale_range
    world = distributed.world()
    tags = {"dataset_hash": data_hash, "params_hash": params_hash(common, params, extras), "device": ctx.device.type,
            "precision": "bf16-autocast" if ctx.amp else "fp32", "world_size": str(world.size)}
    log.info("stage %s: %d train tiles, %d val scales, device %s (%s), %d process(es)", stage,
             len(ctx.train_tiles), len(ctx.val), ctx.device.type, tags["precision"], world.size)
    run_params = {"train": asdict(common), f"train_{stage}": asdict(params)}
    with tracking.stage_run(stage, experiment=common.experiment, tags=tags, params=run_params) as run_id:
        upstream_runs = {name: {"hash": weights_hash(models_dir / name),
                                "run_id": read_config(models_dir / name, name).get("run_id")}
                         for name in UPSTREAM[stage]}
        sweep = start_sweep(stage, params, storage_url(common.study_storage), common.heartbeat_s,
                            {"parent_run": run_id, "sweep_hash": sweep_hash(common, params, extras),
                             "dataset_hash": data_hash, "upstream": upstream_runs, "tags": tags,
                             "software": provenance.software()})
        try:
            ran = work(stage, params, sweep, train, tags)
            best, best_trial, study = finish(stage, params, sweep)
        except BaseException:
            sweep.close()  # workers elsewhere stop joining it; a trial of theirs still running ends on its own
            raise
        trials = study.trials
        metrics = {"objective": best.score, **best.metrics,
                   "trials_complete": sum(t.state.name == "COMPLETE" for t in trials),
                   "trials_failed": sum(t.state.name == "FAIL" for t in trials),
                   "trials_pruned": sum(t.state.name == "PRUNED" for t in trials)}
        workers = sorted({t.user_attrs.get("worker", "?") for t in trials})
        tracking.set_tags({"sweep.study": sweep.name, "sweep.workers": ", ".join(workers)[:500]})
        extra = {"upstream": upstream_hashes(stage, models_dir), "scale_range": list(scale_range),
                 "run_id": run_id, "dataset_hash": data_hash, "best_params": best_trial.params,
                 "study": study.study_name}
        if stage == "autoencoder":  # the pixel interface: the bands and radiometry of the training data
            extra["data"] = data_spec(common.data_dir).to_config()  # recorded by the ETL in the manifest
        network = best.network.to(ctx.device)
        if stage == "diffusion":
            model = HNDSR(ctx.autoencoder, ctx.operator, network,
                          DDIMScheduler(DDIMConfig(extras.num_train_timesteps, extras.prediction_type)),
                          min_scale=scale_range[0], max_scale=scale_range[1], data=data_spec(common.data_dir))
            sampling, table = choose_sampling(model, ctx, extras)
            extra.update(sampling=asdict(sampling), scheduler=asdict(model.scheduler.config), sampling_table=table)
            metrics.update(default_steps=sampling.steps, default_temperature=sampling.temperature,
                           default_strength=sampling.strength)
            chosen = next(r for r in table if r.get("chosen"))
            prior = next(r for r in table if r["steps"] == 0)
            metrics.update(val_psnr_cost=chosen["max_psnr_cost"], val_detail_ratio=chosen["detail_ratio"],
                           val_gmsd=chosen["gmsd"], val_gmsd_steps0=prior["gmsd"], val_ms_ssim=chosen["ms_ssim"])
        tracking.log_metrics({f"best_{k}": v for k, v in metrics.items()})
        tracking.log_params({f"best.{k}": v for k, v in best_trial.params.items()})
        log_study_plots(study)
        with atomic_directory(models_dir / stage) as staging:
            save_network(staging, stage, network.cpu(), extra=extra)
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        tracking.log_artifacts(models_dir / stage, CHECKPOINT)  # where a sweep worker elsewhere finds it as upstream
        metrics_json = json.dumps(metrics, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write_bytes(metrics_dir / f"{stage}.json", metrics_json)
        atomic_write_bytes(metrics_dir / f"{stage}_curve.csv", _curve_csv(best.history))
        tracking.log_artifact(metrics_dir / f"{stage}_curve.csv")
    print(f"train {stage}: best objective {best.score:.4f} ({metrics['trials_complete']} complete, "
          f"{metrics['trials_failed']} failed, {metrics['trials_pruned']} pruned of {params.n_trials}; "
          f"{ran} run here, workers: {', '.join(workers)}); "
          f"{json.dumps({k: round(v, 4) for k, v in best.metrics.items()})}; run {run_id}; "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return metrics


CHECKPOINT = "checkpoint"  # the stage run's artifact folder holding the stage's checkpoint


def run_worker(stage: str | None, params_path: str, wait_s: float) -> int:
    """`hndsr train [STAGE] --worker`: join open sweeps (of STAGE, or of any stage as they come) and run their
    queued trials, until no sweep with queued trials appears within `wait_s`. Returns the trials run here."""
    common = load_common(params_path)
    device, amp = setup_runtime(common)
    world = distributed.init(device.type == "cuda")
    url, total = storage_url(common.study_storage), 0
    try:
        with tempfile.TemporaryDirectory(prefix="hndsr-worker-") as cache:
            while True:
                found = find_sweep(stage, url, common.heartbeat_s, wait_s) if world.main else None
                found = distributed.share(None if found is None else (found.name, found.info))
                if found is None:
                    log.info("no open sweep%s with queued trials; this worker ran %d trial(s)",
                             f" of {stage}" if stage else "", total)
                    return total
                sweep = Sweep(open_storage(url, common.heartbeat_s), *found)
                total += _work_on(sweep, common, params_path, device, amp, Path(cache))
    finally:
        distributed.finish()


def _work_on(sweep: Sweep, common: TrainCommon, params_path: str, device, amp: bool, cache: Path) -> int:
    info, stage = sweep.info, sweep.info["stage"]
    params, extras = load_stage(params_path, stage)
    log.info("joining %s (%s, %d trials in all, stage run %s)", sweep.name, stage, sweep.budget, info["parent_run"])
    if sweep_hash(common, params, extras) != info["sweep_hash"]:
        raise TrainingError(f"this machine's params for {stage} differ from those of the sweep {sweep.name}: run the "
                            "worker from the same commit and params.yaml as the stage (train.scale_range, "
                            f"train.val_tiles and train_{stage} must match)")
    if "software" in info:  # a worker with other code or packages would train other trials than the stage's
        provenance.check_same_software(f"the stage that opened {sweep.name}", info["software"], than="this worker")
    local = dataset_hash(common.data_dir) if (Path(common.data_dir) / "manifest.json").is_file() else None
    if local != info["dataset_hash"]:
        raise TrainingError(f"{common.data_dir} here is {'missing' if local is None else 'different data'} "
                            f"(dataset hash {local}), the sweep trains on {info['dataset_hash']}: fetch it with "
                            "`dvc pull data/processed`, or make it with `dvc repro etl` (the ETL is deterministic)")
    tracking.parent_run(info["parent_run"])  # a clear error when this machine logs to another tracking store
    upstream = _fetch_upstream(stage, info["upstream"], Path(common.models_dir), cache)
    ctx = _context(common, extras, upstream, device, amp)
    train = partial(_trial, TRAINERS[stage], params, ctx)
    if not distributed.world().main:
        follow(train)
        return 0
    ran = work(stage, params, sweep, train, info.get("tags", {}))
    log.info("%s: no queued trial left; ran %d here", sweep.name, ran)
    return ran


def _fetch_upstream(stage: str, expected: dict, models_dir: Path, cache: Path) -> dict:
    """The frozen upstream networks the sweep trains on: this machine's models/<name> when it holds the same
    weights, else the checkpoint the upstream stage logged to its MLflow run (downloaded once per worker)."""
    networks = {}
    for name in UPSTREAM[stage]:
        want = expected[name]
        folder = models_dir / name
        if not ((folder / "model.safetensors").is_file() and weights_hash(folder) == want["hash"]):
            folder = cache / want["run_id"] / name
            if not folder.is_dir():
                log.info("fetching the %s checkpoint from the stage run %s", name, want["run_id"])
                tracking.download_artifacts(want["run_id"], CHECKPOINT, folder.parent)
                (folder.parent / CHECKPOINT).rename(folder)
            if weights_hash(folder) != want["hash"]:
                raise TrainingError(f"the {name} checkpoint of run {want['run_id']} is not the one the sweep trains "
                                    "on (weights hash differs)")
        networks[name], _ = load_network(folder, name)
    return networks


def _trial(trainer, params, ctx, hp, report, seed):
    return trainer(params, hp, ctx, report, seed)
