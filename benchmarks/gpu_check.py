"""The GPU path in one run: the CUDA tests, training, the engine's latency, CUDA against CPU, and the HTTP
server, written to one JSON report and printed as a table.

    python benchmarks/gpu_check.py [--data data/processed] [--models DIR] [--report PATH] [--baseline PATH]
    python benchmarks/gpu_check.py --dry-run [...]      the same script on the CPU, at toy sizes (the tests run it)
    python benchmarks/gpu_check.py --device cpu --sections training --report reports/gpu/cpu-baseline.json
                                                        the training on this CPU: the GPU's baseline
    make gpu-check                                      the first line, on this machine's GPU

Sections, each recorded in the report whatever happens to the others (a section that raises is reported with its
error and the run goes on, so one GPU session gives every answer it can):

1. `environment`: the device (name, memory, compute capability, driver), the software (Python, torch, CUDA, cuDNN,
   the project's code hash: hndsr.provenance) and a matrix-product probe, the fastest thing the device does:
   bfloat16 8192^3 on CUDA (float32 512^3 in a dry run), TFLOP/s from the median of timed products.
2. `tests`: `pytest -m cuda tests/cuda` (the `auto` device, the bfloat16 and compile start-up checks with 8
   requests batched through the engine, the engine's pass-budget probe, DDP on NCCL with one process); each test's
   outcome. They skip without CUDA.
3. `training`: the three real stages (`training.stages.run_stage`: an Optuna study, MLflow runs, checkpoints) and
   the real evaluation on `--data`, with params.yaml's networks, batches and crops for a few hundred steps (a dry
   run: the test suite's tiny networks): each stage's throughput (samples/s, as the trainer measures it over its
   optimisation steps), seconds and peak device memory, the trained model's gain over bicubic on the test split;
   with a `--device cpu` run's report as `--baseline` (reports/gpu/cpu-baseline.json), the speed-up over it.
4. `engine`: the trained model (or `--models`) loaded as `hndsr serve` loads it (serving.runtime.start: the
   start-up checks, the `auto` pass budget), then requests through the engine: LR 128, 256 and 512 px at x4,
   steps 0 and 4, one at a time (p50/p95) and 8 at once (the engine's batching; p50/p95 and requests/s); peak
   memory; the diffusion UNet alone at the largest latent and the engine's batch: achieved TFLOP/s (FLOPs counted
   by torch.utils.flop_counter) against the probe.
5. `agreement`: the served output (on the device, in the precision its start-up check kept) against the model's
   float32 output on the CPU, same real input, scale, steps and seed: PSNR in dB (target >= 45).
6. `http`: `hndsr serve` on the device and `mlflow models serve` (the version registered as the pipeline
   registers it; its pyfunc runs on the GPU in float32) on the same machine, each answering a real 256 px crop at
   concurrency 1 and 8 (requests sent as benchmarks/serve_load.py sends them): requests/s, p50/p95, the ratio.

Targets (issue 27, on the H200): 256 -> 1024 px at x4 with 4 steps, p50 <= 50 ms; the UNet at >= 40 % of the
bfloat16 probe; CUDA within 45 dB of CPU float32. The report says for each whether it was met. Exit status 1 when
a section failed or a CUDA test failed.

A GPU machine without the project's stack (the lent one: no MLflow, Optuna, FastAPI or rasterio, no package
index) gets them from `benchmarks/gpu_kit.py`'s folder; docs/how-to/gpu-check.md says how.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the project's packages from this checkout
    sys.path.insert(0, str(REPO))

log = logging.getLogger("hndsr.gpu_check")

# The training recipes. On the device: params.yaml's networks, batches and crops (what users train), for a few
# hundred steps, one trial per stage. In a dry run: the test suite's tiny networks (tests/tracking.py).
SHORT = {
    "train": {"val_tiles": 4, "processes": 1, "threads": 0},
    "train_autoencoder": {"n_trials": 1, "iterations": 60, "eval_every": 60, "search": {}},
    "train_operator": {"n_trials": 1, "iterations": 300, "eval_every": 300, "search": {}},
    "train_diffusion": {"n_trials": 1, "iterations": 150, "eval_every": 150, "search": {}},
}
TINY = {
    "train": {"val_tiles": 4, "processes": 1, "threads": 0},
    "train_autoencoder": {"n_trials": 1, "iterations": 40, "eval_every": 20, "batch_size": 8, "crop": 32,
                          "model": {"latent_channels": 8, "width": 8, "blocks": 1}, "search": {}},
    "train_operator": {"n_trials": 1, "iterations": 300, "eval_every": 150, "batch_size": 8, "crop": 32,
                       "model": {"width": 12, "modes": 6, "layers": 2}, "search": {}},
    "train_diffusion": {"n_trials": 1, "iterations": 20, "eval_every": 10, "batch_size": 8, "crop": 32,
                        "model": {"width": 8, "emb_dim": 16}, "search": {}},
}
SAMPLING = {"steps_choices": [4], "temperature_choices": [0.35], "strength_choices": [0.5]}
STAGES = ("autoencoder", "operator", "diffusion")


class Plan:
    """What one run measures: the full set on the device, toy sizes in a dry run (same code, minutes on 2 cores)."""

    def __init__(self, dry_run: bool, device: str = "cuda") -> None:
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else device)
        self.recipe = TINY if dry_run else SHORT
        self.sizes = [32, 48] if dry_run else [128, 256, 512]
        self.steps = [0, 1] if dry_run else [0, 4]
        self.scale = 4.0
        self.requests = 2 if dry_run else 20  # one at a time, per size and steps
        self.concurrency = [1, 2] if dry_run else [1, 8]
        self.rounds = 1 if dry_run else 4  # of `concurrency` requests at once
        self.probe = (torch.float32, 512, 3) if dry_run else (torch.bfloat16, 8192, 10)
        self.http_size = 32 if dry_run else 256
        self.http_requests = 2 if dry_run else 16
        self.agreement_size = 32 if dry_run else 128


# -- helpers ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def real_crop(size: int, channels: int = 3) -> np.ndarray:
    """A size x size crop of real imagery in model units: the reference input (a Blue Marble crop, 64 px) tiled."""
    from hndsr.reference import reference_input

    reference = reference_input(channels)[0].permute(1, 2, 0).numpy()
    repeats = size // reference.shape[0] + 1
    return np.ascontiguousarray(np.tile(reference, (repeats, repeats, 1))[:size, :size], dtype=np.float32)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


# -- 1. environment and the matmul probe -------------------------------------------------------------------


def matmul_probe(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict:
    """TFLOP/s of an n^3 matrix product on random data (median of `repeats` after 3 warm-ups)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    times = []
    for i in range(3 + repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "median_ms": _ms(statistics.median(times)),
            "tflops": round(2 * n**3 / statistics.median(times) / 1e12, 3)}


def environment(plan: Plan) -> dict:
    from hndsr import provenance

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "software": provenance.software(), "dry_run": plan.dry_run}
    if plan.device.type == "cuda":
        properties = torch.cuda.get_device_properties(plan.device)
        info.update(device=properties.name, memory_gb=round(properties.total_memory / 1e9, 1),
                    capability=f"{properties.major}.{properties.minor}", multiprocessors=properties.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
    else:
        info.update(device=f"cpu: {info['cpu']}", memory_gb=None)
    dtype, n, repeats = plan.probe
    info["probe"] = matmul_probe(plan.device, dtype, n, repeats)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# -- 2. the CUDA tests -------------------------------------------------------------------------------------


def cuda_tests(plan: Plan, workdir: Path) -> dict:
    """`pytest -m cuda tests/cuda` in a subprocess; each test's outcome from its JUnit XML."""
    junit = workdir / "cuda-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "addopts=--strict-markers --import-mode=importlib -p pytester"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
                                str(REPO), os.environ.get("PYTHONPATH"))))})
    outcomes = {}
    if junit.exists():
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            name = case.get("name")
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if failed is not None:
                outcomes[name] = {"outcome": "failed", "detail": (failed.get("message") or "")[:500]}
            elif skipped is not None:
                outcomes[name] = {"outcome": "skipped", "detail": (skipped.get("message") or "")[:200]}
            else:
                outcomes[name] = {"outcome": "passed", "seconds": round(float(case.get("time", 0)), 1)}
    counts = {k: sum(o["outcome"] == k for o in outcomes.values()) for k in ("passed", "failed", "skipped")}
    return {"exit_status": result.returncode, "seconds": round(time.perf_counter() - start, 1), **counts,
            "tests": outcomes, "output_tail": (result.stdout + result.stderr)[-1500:]}


# -- 3. tiny training ----------------------------------------------------------------------------------------


def training(plan: Plan, data: Path, workdir: Path) -> dict:
    """The three real stages and the evaluation, in this process, into `workdir`: each stage's throughput, time and
    peak device memory, and the trained model's gain over bicubic on the test split."""
    from training.evaluate import evaluate
    from training.stages import run_stage

    project = workdir / "train"
    project.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in plan.recipe.items():
        params[name].update(values)
    params["train"].update(data_dir=str(data.resolve()), models_dir=str(project / "models"),
                           metrics_dir=str(project / "metrics"), study_storage=f"sqlite:///{project / 'optuna.db'}",
                           device=plan.device.type, experiment="gpu-check")
    params["train_diffusion"]["sampling"].update(SAMPLING)
    params_path = project / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    stages = {}
    with _environment(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"):
        for stage in STAGES:
            _peak_reset(plan.device)
            start = time.perf_counter()
            metrics = run_stage(stage, str(params_path))
            seconds = time.perf_counter() - start
            stages[stage] = {"seconds": round(seconds, 1), "samples_per_s": _throughput(stage),
                             "peak_memory_mb": _peak_mb(plan.device), "objective": round(metrics["objective"], 4),
                             "batch_size": params[f"train_{stage}"]["batch_size"],
                             "crop": params[f"train_{stage}"]["crop"], "model": params[f"train_{stage}"]["model"],
                             "iterations": params[f"train_{stage}"]["iterations"]}
        start = time.perf_counter()
        scores = evaluate(str(params_path), report_dir=str(project / "reports"))["scales"]
    gains = {scale: round(row["psnr"] - row["bicubic_psnr"], 3) for scale, row in scores.items()}
    return {"recipe": "tiny (the test suite's)" if plan.recipe is TINY else "params.yaml's networks, short",
            "stages": stages, "evaluate_s": round(time.perf_counter() - start, 1),
            "test_gain_over_bicubic_db": gains, "models": str(project / "models")}


def _throughput(stage: str) -> float | None:
    """The median `samples_per_s` the trainer logged to the stage's trial runs (MLflow)."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=["gpu-check"], filter_string=f"tags.stage = '{stage}'",
                              output_format="list")
    client = mlflow.MlflowClient()
    rates = [m.value for run in runs for m in client.get_metric_history(run.info.run_id, "samples_per_s")]
    return round(statistics.median(rates), 1) if rates else None


@contextlib.contextmanager
def _environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- 4. the engine ----------------------------------------------------------------------------------------


def start_engine(plan: Plan, models: Path):
    """The model and engine exactly as `hndsr serve` starts them (serving.runtime.start), without calibration."""
    from inference import runtime
    from serving.settings import load_settings

    settings = load_settings(model_uri=str(models), device=plan.device.type)
    return runtime.start(settings, calibrate=False)


def engine_latency(plan: Plan, loaded, engine, probe_tflops: float) -> dict:
    from inference.engine import hr_size

    model = loaded.model
    rows = []
    _peak_reset(plan.device)
    for size in plan.sizes:
        lr = real_crop(size, model.data.channels)
        for steps in plan.steps:
            def one(seed: int, lr=lr, steps=steps) -> float:
                start = time.perf_counter()
                engine.submit(loaded, lr, plan.scale, steps, seed, deadline_s=600).future.result()
                return time.perf_counter() - start

            one(0)  # warm-up: this shape's kernels (and compiled graph) before timing
            alone = [one(i) for i in range(plan.requests)]
            rows.append({"size": size, "out": hr_size(size, plan.scale), "steps": steps, "concurrency": 1,
                         "p50_ms": _ms(statistics.median(alone)), "p95_ms": _ms(_percentile(alone, 95)),
                         "requests_per_s": round(len(alone) / sum(alone), 2)})
            many = max(plan.concurrency)
            latencies, started = [], time.perf_counter()
            for round_ in range(plan.rounds):
                submitted = time.perf_counter()
                jobs = [engine.submit(loaded, lr, plan.scale, steps, round_ * many + i, deadline_s=600)
                        for i in range(many)]
                for job in jobs:
                    job.future.result()
                    latencies.append(job.finished - job.submitted if job.finished else time.perf_counter() - submitted)
            wall = time.perf_counter() - started
            rows.append({"size": size, "out": hr_size(size, plan.scale), "steps": steps, "concurrency": many,
                         "p50_ms": _ms(statistics.median(latencies)), "p95_ms": _ms(_percentile(latencies, 95)),
                         "requests_per_s": round(len(latencies) / wall, 2)})
            log.info("engine %d px steps %d: p50 %.1f ms alone, %.1f ms at %d", size, steps, rows[-2]["p50_ms"],
                     rows[-1]["p50_ms"], many)
    return {"acceleration": loaded.acceleration.report(), "engine": engine.describe(), "scale": plan.scale,
            "default_steps": model.defaults.steps, "latency": rows, "peak_memory_mb": _peak_mb(plan.device),
            "unet": unet_rate(plan, loaded, engine.max_batch, probe_tflops)}


def unet_rate(plan: Plan, loaded, batch: int, probe_tflops: float) -> dict:
    """The diffusion UNet alone, as the engine runs it (its precision and compilation), on the latent of the
    largest size at x4 and a batch of the engine's max: achieved TFLOP/s and its share of the matmul probe."""
    from torch.utils.flop_counter import FlopCounterMode

    model, device = loaded.model, plan.device
    size = max(plan.sizes)
    lr = torch.from_numpy(real_crop(size, model.data.channels)).permute(2, 0, 1)[None].to(device)
    with torch.inference_mode(), loaded.acceleration.autocast(device):
        prior, scales = _prior(model, lr, plan.scale)
        prior = prior.expand(batch, -1, -1, -1).contiguous()
        scales = scales.expand(batch)
        timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
        noisy = torch.randn_like(prior)

        def call():
            return model.unet(noisy, timestep, prior, scales)

        eager = getattr(model.unet, "_orig_mod", model.unet)  # FLOPs counted on the eager module, timed as served
        with FlopCounterMode(display=False) as counter:
            eager(noisy, timestep, prior, scales)
        flops = counter.get_total_flops()
        for _ in range(3):
            call()
        times = []
        for _ in range(5 if plan.dry_run else 50):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - start)
    achieved = flops / statistics.median(times) / 1e12
    return {"latent": list(prior.shape), "gflop": round(flops / 1e9, 2), "median_ms": _ms(statistics.median(times)),
            "tflops": round(achieved, 3), "of_probe": round(achieved / probe_tflops, 3) if probe_tflops else None}


def _prior(model, lr: torch.Tensor, scale: float):
    """The operator's latent prior for `lr` at `scale` and the scale tensor the UNet takes (hndsr.model)."""
    from hndsr.model import output_size

    prior = model.prior(lr, scale, output_size(lr, scale))
    return prior, torch.full((lr.shape[0],), scale, device=lr.device)


# -- 5. agreement -----------------------------------------------------------------------------------------


def agreement(plan: Plan, loaded, models: Path) -> dict:
    """The served output against the model's float32 CPU output: same input, scale, steps and seed."""
    from hndsr.checkpoint import load_model
    from inference.acceleration import psnr

    lr = torch.from_numpy(real_crop(plan.agreement_size, loaded.model.data.channels)).permute(2, 0, 1)[None]
    steps = max(plan.steps)
    cpu = load_model(models)
    with torch.inference_mode():
        reference = cpu.super_resolve(lr, plan.scale, steps=steps, seed=0).float()
        with loaded.acceleration.autocast(plan.device):
            served = loaded.model.super_resolve(lr.to(plan.device), plan.scale, steps=steps, seed=0).float().cpu()
    value = psnr(served, reference)
    return {"size": plan.agreement_size, "scale": plan.scale, "steps": steps,
            "served_as": loaded.acceleration.report()["precision"], "psnr_db": round(value, 2) if value != float("inf")
            else "identical", "max_abs_diff_255": round(float((served - reference).abs().max()) * 255, 2)}


# -- 6. HTTP ----------------------------------------------------------------------------------------------


def http(plan: Plan, models: Path, workdir: Path) -> dict:
    """`hndsr serve` and `mlflow models serve` on this machine, each at each concurrency on a real crop, the
    requests sent as benchmarks/serve_load.py sends them (one mechanism for both benchmarks)."""
    import base64

    from serve_load import _free_port, _image, _load, _start

    size, steps = plan.http_size, max(plan.steps)
    image = _image(size)
    results = {"size": size, "scale": plan.scale, "steps": steps, "servers": {}}
    ours_port, mlflow_port = _free_port(), _free_port()
    payload = {"dataframe_split": {"columns": ["image", "scale", "steps", "seed"],
                                   "data": [[base64.b64encode(image).decode(), plan.scale, steps, 0]]}}

    def start_ours() -> subprocess.Popen:
        env = _child_env(MODEL_URI=str(models.resolve()), HNDSR_DEVICE=plan.device.type)
        return _start([*_bin("hndsr"), "serve", "--port", str(ours_port)], f"http://127.0.0.1:{ours_port}/readyz",
                      env, workdir / "hndsr-serve.log")

    def start_mlflow() -> subprocess.Popen:
        uri, version = _register(models, workdir)
        return _start([*_bin("mlflow"), "models", "serve", "-m", f"models:/gpu-check/{version}", "--env-manager", "local",
                       "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1", "-t", "600"],
                      f"http://127.0.0.1:{mlflow_port}/ping", _child_env(MLFLOW_TRACKING_URI=uri),
                      workdir / "mlflow-serve.log")

    def send_ours(client) -> int:
        return client.post(f"http://127.0.0.1:{ours_port}/v1/super-resolve",
                           files={"file": ("in.png", image, "image/png")},
                           data={"scale": f"{plan.scale:g}", "steps": str(steps), "seed": "0"}).status_code

    def send_mlflow(client) -> int:
        return client.post(f"http://127.0.0.1:{mlflow_port}/invocations", json=payload).status_code

    for name, start, send in (("hndsr serve", start_ours, send_ours), ("mlflow models serve", start_mlflow,
                                                                        send_mlflow)):
        try:
            process = start()
        except (SystemExit, Exception) as exc:  # serve_load's _start exits with the server's log
            results["servers"][name] = {"error": f"did not start: {exc}"[-1500:]}
            continue
        try:
            _load(send, 1, 1)  # warm-up
            levels = {}
            for concurrency in plan.concurrency:
                count = max(plan.http_requests, concurrency)
                latencies, codes, wall = _load(send, count, concurrency)
                levels[str(concurrency)] = {"requests": count, "requests_per_s": round(count / wall, 2),
                                            "p50_ms": _ms(statistics.median(latencies)),
                                            "p95_ms": _ms(_percentile(latencies, 95)),
                                            "not_200": sum(code != 200 for code in codes)}
            results["servers"][name] = {"concurrency": levels}
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    ours, theirs = (results["servers"][k].get("concurrency") for k in ("hndsr serve", "mlflow models serve"))
    if ours and theirs:
        results["ratio"] = {c: round(ours[c]["requests_per_s"] / theirs[c]["requests_per_s"], 2) for c in ours}
    broken = {name: server.get("error") or "answers other than 200"
              for name, server in results["servers"].items()
              if "error" in server or any(level["not_200"] for level in server["concurrency"].values())}
    if broken:
        results["error"] = "; ".join(f"{name}: {why}" for name, why in broken.items())[:2000]
    return results


def _bin(name: str) -> list[str]:
    """A console script of this interpreter's environment or on PATH (the kit's /tmp/site/bin), else
    `python -m` of its module."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", {"hndsr": "hndsr.cli", "mlflow": "mlflow"}[name]]


def _child_env(**extra: str) -> dict[str, str]:
    """This checkout first on the import path, and this interpreter's scripts (uvicorn for MLflow) on PATH."""
    python_path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    path = os.pathsep.join(filter(None, (str(Path(sys.executable).parent), os.environ.get("PATH"))))
    return {**os.environ, "PYTHONPATH": python_path, "PATH": path, **extra}


def _register(models: Path, workdir: Path) -> tuple[str, str]:
    """Register `models` (with the evaluation in ../metrics that `hndsr registry` records) as version 1 of
    `gpu-check` in a database of its own, as the pipeline registers a candidate: (tracking URI, version)."""
    from registry.promote import load_candidate, register
    from registry.store import Registry

    metrics = models.resolve().parent / "metrics"
    if not (metrics / "eval.json").exists():
        raise RuntimeError(f"{metrics / 'eval.json'} is missing: registering a version for `mlflow models serve` "
                           "needs the model's evaluation (`hndsr evaluate`), or leave --models out")
    project = workdir / "mlflow"
    project.mkdir(exist_ok=True)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    with _environment(MLFLOW_TRACKING_URI=uri):
        version, _ = register(Registry("gpu-check", uri), load_candidate(models, metrics), REPO / "params.yaml",
                              "gpu-check")
    return uri, version.version


# -- the run ----------------------------------------------------------------------------------------------


def targets(report: dict) -> dict:
    """Issue 27's targets, each met, missed or not measured."""
    out = {}
    rows = report.get("engine", {}).get("latency", [])
    row = next((r for r in rows if r["size"] == 256 and r["steps"] == 4 and r["concurrency"] == 1), None)
    out["p50_256px_x4_4steps_ms<=50"] = None if row is None else {"value": row["p50_ms"], "met": row["p50_ms"] <= 50}
    unet = report.get("engine", {}).get("unet", {})
    share = unet.get("of_probe")
    out["unet_of_bf16_probe>=0.40"] = None if share is None else {"value": share, "met": share >= 0.40}
    value = report.get("agreement", {}).get("psnr_db")
    out["agreement_db>=45"] = None if value is None else {
        "value": value, "met": value == "identical" or float(value) >= 45}
    return out


def compare_training(report: dict, baseline: dict | None) -> None:
    if not baseline:
        return
    ours, theirs = report.get("training", {}).get("stages"), baseline.get("training", {}).get("stages")
    if not ours or not theirs:
        return
    for stage, row in ours.items():
        base = theirs.get(stage, {}).get("samples_per_s")
        if base and row.get("samples_per_s"):
            row["baseline_samples_per_s"] = base
            row["speedup"] = round(row["samples_per_s"] / base, 1)
    report["training"]["baseline"] = baseline.get("environment", {}).get("device")


def section(report: dict, name: str, run: Callable[[], dict]) -> None:
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        report[name] = run()
    except Exception as exc:  # one broken section must not cost the others (one GPU session per day)
        report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                        "traceback": traceback.format_exc()[-4000:]}
        print(f"   {name} failed: {type(exc).__name__}: {exc}", flush=True)
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)


def table(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"device: {env.get('device')}  torch {env.get('torch')}  CUDA {env.get('cuda')}  "
             f"probe {env.get('probe', {}).get('dtype')} {env.get('probe', {}).get('tflops')} TFLOP/s"]
    tests = report.get("tests")
    if tests:
        lines.append(f"cuda tests: {tests.get('passed')} passed, {tests.get('failed')} failed, "
                     f"{tests.get('skipped')} skipped" if "error" not in tests else f"cuda tests: {tests['error']}")
    for stage, row in report.get("training", {}).get("stages", {}).items():
        lines.append(f"train {stage:<12} {row['samples_per_s']} samples/s"
                     + (f" ({row['speedup']}x the CPU baseline)" if "speedup" in row else "")
                     + f", peak {row['peak_memory_mb']} MB, {row['seconds']} s")
    if "test_gain_over_bicubic_db" in report.get("training", {}):
        lines.append(f"trained ({report['training']['recipe']}), test split over bicubic (dB): "
                     f"{report['training']['test_gain_over_bicubic_db']}")
    engine = report.get("engine", {})
    if "latency" in engine:
        lines.append(f"engine: {engine['acceleration']['precision']}"
                     f"{' compiled' if engine['acceleration']['compiled'] else ''}, pass budget "
                     f"{engine['engine']['pass_megapixels']:.2f} MP, batch {engine['engine']['max_batch']}, "
                     f"peak {engine['peak_memory_mb']} MB")
        lines.append(f"  {'LR px':>6} {'out px':>7} {'steps':>5} {'conc':>4} {'p50 ms':>9} {'p95 ms':>9} {'req/s':>7}")
        for row in engine["latency"]:
            lines.append(f"  {row['size']:>6} {row['out']:>7} {row['steps']:>5} {row['concurrency']:>4} "
                         f"{row['p50_ms']:>9} {row['p95_ms']:>9} {row['requests_per_s']:>7}")
        unet = engine["unet"]
        lines.append(f"  UNet {unet['latent']}: {unet['gflop']} GFLOP in {unet['median_ms']} ms = {unet['tflops']} "
                     f"TFLOP/s, {unet['of_probe']} of the probe")
    elif "error" in engine:
        lines.append(f"engine: {engine['error']}")
    agree = report.get("agreement")
    if agree:
        lines.append(f"agreement with CPU float32: {agree.get('psnr_db')} dB ({agree.get('served_as')})"
                     if "error" not in agree else f"agreement: {agree['error']}")
    for name, server in report.get("http", {}).get("servers", {}).items():
        if "error" in server:
            lines.append(f"http {name}: {server['error'][:300]}")
        else:
            lines.append(f"http {name}: " + ", ".join(f"c={c} {v['requests_per_s']} req/s p50 {v['p50_ms']} ms"
                                                      for c, v in server["concurrency"].items()))
    if "ratio" in report.get("http", {}):
        lines.append(f"http ratio hndsr/mlflow: {report['http']['ratio']}")
    for name, target in report.get("targets", {}).items():
        lines.append(f"target {name}: " + ("not measured" if target is None else
                                           f"{target['value']} ({'met' if target['met'] else 'MISSED'})"))
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    lines.append("sections failed: " + (", ".join(failed) if failed else "none"))
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "device"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU at toy sizes: the same code paths, to check the script without a GPU")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="where to run the full plan (default: %(default)s); `--device cpu --sections training` "
                             "measures the CPU baseline the GPU's training is compared with")
    parser.add_argument("--models", type=Path, default=None,
                        help="trained checkpoints for the engine, agreement and HTTP sections, with their "
                             "evaluation in ../metrics (e.g. `make repro`'s models; default: the ones this run trains)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "processed",
                        help="the ETL's Parquet splits to train on (default: %(default)s; the kit's is small)")
    parser.add_argument("--report", type=Path, default=None,
                        help="JSON report (default: reports/gpu/<device>.json; a dry run: reports/gpu/dry-run.json)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a `--device cpu` run's report to compare the training throughput with "
                             "(default: reports/gpu/cpu-baseline.json if present)")
    parser.add_argument("--sections", nargs="+", default=["tests", "training", "engine", "agreement", "http"],
                        choices=["tests", "training", "engine", "agreement", "http"], help="what to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.dry_run and args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; `--dry-run` checks the script on the CPU", file=sys.stderr)
        return 2
    plan = Plan(args.dry_run, args.device)
    if plan.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    section(report, "environment", lambda: environment(plan))
    probe = report["environment"].get("probe", {}).get("tflops", 0.0)
    workdir = Path(tempfile.mkdtemp(prefix="hndsr-gpu-check-"))
    try:
        if "tests" in args.sections:
            section(report, "tests", lambda: cuda_tests(plan, workdir))
        if "training" in args.sections:
            section(report, "training", lambda: training(plan, args.data, workdir))
        models = args.models
        if models is None and "models" in report.get("training", {}):
            models = Path(report["training"]["models"])
        report["models"] = str(models) if models else None
        wanted = [s for s in ("engine", "agreement") if s in args.sections]
        if wanted and models is None:
            for name in wanted:
                report[name] = {"error": "no trained model: pass --models DIR or run the training section"}
        elif wanted:
            loaded = engine = None
            try:
                loaded, engine = start_engine(plan, models)
            except Exception as exc:
                for name in wanted:
                    report[name] = {"error": f"the engine did not start: {type(exc).__name__}: {exc}"[:2000]}
            if engine is not None:
                if "engine" in wanted:
                    section(report, "engine", lambda: engine_latency(plan, loaded, engine, probe))
                if "agreement" in wanted:
                    section(report, "agreement", lambda: agreement(plan, loaded, models))
                engine.close()
                del loaded, engine
                if plan.device.type == "cuda":
                    torch.cuda.empty_cache()
        if "http" in args.sections:
            if models is None:
                report["http"] = {"error": "no trained model: pass --models DIR or run the training section"}
            else:
                section(report, "http", lambda: http(plan, models, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    baseline_path = args.baseline or (REPO / "reports" / "gpu" / "cpu-baseline.json")
    if baseline_path.exists() and plan.device.type == "cuda":
        compare_training(report, json.loads(baseline_path.read_text()))
    report["targets"] = targets(report) if plan.device.type == "cuda" else {}
    path = args.report or REPO / "reports" / "gpu" / (
        "dry-run.json" if args.dry_run else f"{slug(report['environment'].get('device', 'device'))}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    print(f"report: {path}")
    return 1 if any(isinstance(v, dict) and "error" in v for v in report.values()) or \
        report.get("tests", {}).get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
