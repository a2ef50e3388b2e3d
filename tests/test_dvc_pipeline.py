"""End to end: `dvc repro` of the real dvc.yaml in a temporary copy of the repository (slow, few)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.compare import digest
from tests.test_stage_dependencies import undeclared_params

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", "hndsr", "pipeline", "training", "imagery",
                  "registry"]


def _run(args, cwd, **extra_env):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra_env}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own default: mlflow.db in the project
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def project(tmp_path, realsat):
    root = tmp_path / "project"
    root.mkdir()
    for name in PIPELINE_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    images = root / "data" / "raw"
    images.mkdir(parents=True)
    for name in ("landsat8_grenada.png", "spacenet6_rotterdam_urban.png", "landsat7_bahamas_crop.png"):
        shutil.copy(realsat / name, images / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["etl"]["source"] = "data/raw"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["git", "init", "-q"], ["git", "add", "-A"]):
        assert _run(args, root).returncode == 0
    return root


@pytest.mark.slow
def test_dvc_repro_runs_etl_then_skips_until_something_changes(project):
    first = _run(["dvc", "repro", "etl"], project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'etl'" in first.stdout
    assert "etl: read 3 images (0 skipped)" in first.stdout
    processed = project / "data" / "processed"
    assert sorted(p.name for p in processed.iterdir()) == [
        "manifest.json", "test.parquet", "train.parquet", "val.parquet"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["etl"]["params"]["params.yaml"]["etl"]["source"] == "data/raw"

    second = _run(["dvc", "repro", "etl"], project)
    assert second.returncode == 0
    assert "Stage 'etl' didn't change, skipping" in second.stdout

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["etl"]["min_tile_std"] = 7.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro", "etl"], project)
    assert third.returncode == 0
    assert "Running stage 'etl'" in third.stdout


@pytest.mark.slow
def test_dvc_repro_fails_cleanly_on_bad_params(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["etl"]["splits"] = {"train": 0.9, "val": 0.1, "test": 0.1}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = _run(["dvc", "repro", "etl"], project)
    assert result.returncode != 0
    assert "etl.splits: train + val + test must sum to 1" in result.stderr + result.stdout
    assert not (project / "data" / "processed").exists()


TINY = {
    "train": {"val_tiles": 4, "study_storage": "sqlite:///optuna.db"},
    "train_autoencoder": {"iterations": 12, "eval_every": 6, "batch_size": 4, "crop": 32,
                          "model": {"latent_channels": 8, "width": 8, "blocks": 1}},
    "train_operator": {"iterations": 12, "eval_every": 6, "batch_size": 4, "crop": 32,
                       "model": {"width": 8, "modes": 4, "layers": 2}},
    "train_diffusion": {"iterations": 12, "eval_every": 6, "batch_size": 4, "crop": 32,
                        "model": {"width": 8, "emb_dim": 16}},
}


def _shrink(project: Path) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, values in TINY.items():
        params[name].update(values)
    params["train_diffusion"]["sampling"].update(steps_choices=[2], temperature_choices=[0.5])
    params["etl"]["splits"] = {"train": 0.5, "val": 0.25, "test": 0.25}
    params["etl"]["split_seed"] = 7  # with three images: grenada train, bahamas val, rotterdam test
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@pytest.mark.slow
@pytest.mark.timeout(900)  # a whole pipeline twice (and forced): 80 s here
def test_full_pipeline_tiny(project):
    params = _shrink(project)
    trace = project / "params-trace.jsonl"
    result = _run(["dvc", "repro"], project, HNDSR_PARAMS_TRACE=str(trace))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Without a terminal (DVC pipes the output) training reports progress as lines, one per evaluation.
    output = result.stdout + result.stderr
    for stage in ("autoencoder", "operator", "diffusion"):
        assert f"{stage} trial 0 of" in output and re.search(rf"{stage}: step \d+/\d+, train loss", output), stage

    # Every stage read only params sections that dvc.yaml declares for it (else DVC would not re-run it).
    traced = {" ".join(line["command"]): line["sections"] for line in map(json.loads, trace.read_text().splitlines())}
    for name, stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items():
        assert stage["cmd"] in traced, f"stage {name} left no params trace"
        assert undeclared_params(stage, traced[stage["cmd"]]["params.yaml"]) == [], name
    for stage in ("autoencoder", "operator", "diffusion"):
        assert (project / "models" / stage / "model.safetensors").is_file()
        assert (project / "models" / stage / "config.json").is_file()
        assert (project / "models" / stage / "metrics.json").is_file()
        assert (project / "metrics" / f"{stage}_curve.csv").read_text().startswith("step,")
    report = json.loads((project / "metrics" / "eval.json").read_text())
    assert set(report["scales"]) == {"2", "2.5", "3", "4"}
    for values in report["scales"].values():
        for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "prior_psnr", "detail_ratio"):
            assert isinstance(values[key], float)
    assert (project / "reports" / "eval_grid.png").stat().st_size > 0
    # The monitoring reference: the training split's input histograms (from the ETL's manifest) and the consistency
    # on validation, for exactly these weights (hndsr/monitoring.py)
    reference = json.loads((project / "models" / "reference.json").read_text())
    manifest = json.loads((project / "data" / "processed" / "manifest.json").read_text())
    assert reference["input"] == manifest["reference"] and reference["models"] == report["models"]
    assert reference["consistency"]["psnr_db"]["p05"] <= reference["consistency"]["psnr_db"]["p50"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hndsr")
    assert experiment.artifact_location == (project / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"autoencoder", "operator", "diffusion", "evaluate", "register", "promote"}
    dataset = json.loads((project / "data" / "processed" / "manifest.json").read_text())["dataset_hash"]
    for stage in ("autoencoder", "operator", "diffusion"):
        parent = parents[stage]
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["dataset_hash"] == dataset
        assert len(parent.data.tags["git_commit"]) >= 7 and len(parent.data.tags["params_hash"]) == 64
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == params[f"train_{stage}"]["n_trials"]
        assert all("val_score" in c.data.metrics for c in children)
        assert "best_objective" in parent.data.metrics
    assert "test_psnr_x4" in parents["evaluate"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parents["operator"].info.run_id)}
    assert "optuna_history.png" in artifacts
    assert (project / "mlartifacts").is_dir() and not (project / "mlruns").exists()

    # The promote stage registered the tiny model and the gate rejected it (12 training iterations do not beat
    # bicubic by the default margin); `dvc repro` still completed and recorded the decision.
    decision = json.loads((project / "reports" / "promotion.json").read_text())
    assert decision["version"] == "1" and decision["decision"] == "rejected", decision
    assert any(reason.startswith("beats_bicubic") for reason in decision["reasons"])
    assert client.get_model_version("hndsr", "1").tags["gate.decision"] == "rejected"
    assert not client.get_registered_model("hndsr").aliases

    again = _run(["dvc", "repro"], project)
    assert again.returncode == 0 and "Data and pipelines are up to date." in again.stdout

    # Determinism on the CPU: forcing every stage again reproduces every metric and every weight exactly.
    before = _outputs(project)
    forced = _run(["dvc", "repro", "--force"], project)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert _outputs(project) == before


def _outputs(project: Path) -> dict[str, str]:
    files = sorted((project / "metrics").glob("*")) + sorted((project / "models").rglob("model.safetensors")) \
        + [project / "models" / "reference.json"]
    return {str(f.relative_to(project)): digest(f) for f in files}
