"""End to end: `dvc repro` of the real dvc.yaml in a temporary copy of the repository (slow, few)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", "hndsr", "pipeline"]


def _run(args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
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
    first = _run(["dvc", "repro"], project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'etl'" in first.stdout
    assert "etl: read 3 images (0 skipped)" in first.stdout
    processed = project / "data" / "processed"
    assert sorted(p.name for p in processed.iterdir()) == [
        "manifest.json", "test.parquet", "train.parquet", "val.parquet"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["etl"]["params"]["params.yaml"]["etl"]["source"] == "data/raw"

    second = _run(["dvc", "repro"], project)
    assert second.returncode == 0
    assert "Stage 'etl' didn't change, skipping" in second.stdout

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["etl"]["min_tile_std"] = 7.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], project)
    assert third.returncode == 0
    assert "Running stage 'etl'" in third.stdout


@pytest.mark.slow
def test_dvc_repro_fails_cleanly_on_bad_params(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["etl"]["splits"] = {"train": 0.9, "val": 0.1, "test": 0.1}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = _run(["dvc", "repro"], project)
    assert result.returncode != 0
    assert "etl.splits: train + val + test must sum to 1" in result.stderr + result.stdout
    assert not (project / "data" / "processed").exists()
