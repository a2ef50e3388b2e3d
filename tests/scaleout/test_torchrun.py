"""Data-parallel training under torchrun on the CPU (gloo): two processes train one stage, rank 0 alone logs and
writes, the result repeats exactly, matches one process to rounding, and the checkpoint serves over HTTP."""

import io
import os
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from hndsr import cores
from tests.conftest import REALSAT
from tests.scaleout.conftest import env, hndsr, write_params
from tests.serving.test_server import Server, post

pytestmark = pytest.mark.scaleout


def _torchrun(project, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "hndsr.cli", *args]
    result = subprocess.run(command, cwd=project, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _weights(project):
    return load_file(str(project / "models" / "diffusion" / "model.safetensors"))


def test_torchrun_two_processes_train_a_stage_that_serves(project, tmp_path):
    for stage in ("autoencoder", "operator"):
        result = hndsr(project, "train", stage, "--params", "params.yaml")
        assert result.returncode == 0, result.stderr[-3000:]
    single = tmp_path / "single"
    shutil.copytree(project, single)
    result = hndsr(single, "train", "diffusion", "--params", "params.yaml")
    assert result.returncode == 0, result.stderr[-3000:]

    first = _torchrun(project, "train", "diffusion", "--params", "params.yaml")
    assert "rank 0 of 2" in first and "rank 1 of 2 (local rank 1, backend gloo)" in first
    assert first.count("train diffusion: best objective") == 1  # rank 0 alone reports, logs and writes
    assert first.count("(stage diffusion) at") == 1
    two = _weights(project)
    # the same world size repeats exactly (train.processes = 2 runs the same thing through torchrun)
    write_params(project, train={"processes": 2})
    again = hndsr(project, "train", "diffusion", "--params", "params.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    # each process its share of the cores (hndsr.cores), unless the environment already says
    expected = os.environ.get("OMP_NUM_THREADS") or str(cores.share(2))
    assert f"2 processes (train.processes), OMP_NUM_THREADS={expected} each" in again.stdout
    assert all(np.array_equal(two[k].numpy(), v.numpy()) for k, v in _weights(project).items())
    # the gradients are synchronised: two processes computing halves of each batch train what one process does
    one = _weights(single)
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 1e-5

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hndsr").experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("stage") == "diffusion" and "trial" not in r.data.tags]
    assert len(stage_runs) == 2 and {r.data.tags["world_size"] for r in stage_runs} == {"2"}
    trials = [r for r in runs if r.data.tags.get("stage") == "diffusion" and "trial" in r.data.tags]
    assert len(trials) == 2  # one trial per stage run: no rank but 0 opened a run

    server = Server({"MODEL_URI": str(project / "models")}, tmp_path)
    try:
        server.wait_ready(120)
        buffer = io.BytesIO()
        Image.open(REALSAT / "landsat8_grenada.png").convert("RGB").crop((0, 0, 40, 32)).save(buffer, "PNG")
        response = post(server.url, buffer.getvalue(), scale="2.5")
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (100, 80)
    finally:
        server.stop()
