"""A figure measured after the evaluation (the ESRGAN peer's) lands in the evaluate run it compares with."""

import time

import mlflow
import pytest

from training import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return mlflow.MlflowClient(uri)


def _evaluate_run(dataset: str, weights: str) -> str:
    tags = {"dataset_hash": dataset, **{f"{s}_weights": weights for s in ("autoencoder", "operator", "diffusion")}}
    with tracking.stage_run("evaluate", experiment="hndsr", tags=tags, params={"steps": 4}) as run_id:
        tracking.log_metrics({"test_psnr_x4": 30.0})
    time.sleep(0.01)  # "newest" is by start time, in milliseconds
    return run_id


def test_peer_figures_join_the_newest_matching_evaluate_run(store):
    older, other = _evaluate_run("d1", "w1"), _evaluate_run("d1", "w2")
    newest = _evaluate_run("d1", "w1")
    models = {s: "w1" for s in ("autoencoder", "operator", "diffusion")}
    run_id = tracking.add_to_evaluation(experiment="hndsr", dataset_hash="d1", models=models,
                                        metrics={"esrgan_gain_x4": 0.36}, tags={"peer": "esrgan"})
    assert run_id == newest
    run = store.get_run(newest)
    assert run.data.metrics == {"test_psnr_x4": 30.0, "esrgan_gain_x4": 0.36} and run.data.tags["peer"] == "esrgan"
    assert "esrgan_gain_x4" not in store.get_run(older).data.metrics
    assert "esrgan_gain_x4" not in store.get_run(other).data.metrics
    assert tracking.add_to_evaluation(experiment="hndsr", dataset_hash="d2", models=models, metrics={"x": 1.0},
                                      tags={}) is None  # another dataset: no run gains anything
    assert tracking.add_to_evaluation(experiment="nowhere", dataset_hash="d1", models=models, metrics={"x": 1.0},
                                      tags={}) is None
