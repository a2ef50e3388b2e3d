"""Stage entry points fail with one clear line when their inputs are missing or stale."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hndsr.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_missing_upstream_checkpoint_and_missing_data(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _cli("train", "operator", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "hndsr train: error: no autoencoder checkpoint in models/autoencoder: run `dvc repro` "
        "(stage train_autoencoder) first")
    result = _cli("train", "autoencoder", cwd=tmp_path)
    assert result.returncode == 1
    assert "data/processed/manifest.json not found: run the etl stage first" in result.stderr
    result = _cli("evaluate", cwd=tmp_path)
    assert result.returncode == 1 and "no autoencoder checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_help_lists_the_stages(tmp_path):
    result = _cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "{autoencoder,operator,diffusion}" in result.stdout
