"""Multi-node on one host (markers `scaleout`, `container`): containers of the worker image
(deploy/images/worker.Dockerfile) are the machines, each with its own hostname and network address, on a Docker
network; the project folder is mounted at the same path in each, as a shared file system would be.

- A sweep: the stage in one container, a worker in a second, the study in the stack's PostgreSQL container and
  the runs in its MLflow server: the same trials, metrics and weights as one process here.
- ETL on a Dask scheduler and two workers in containers, driven from a third: the same bytes as one process.
- `torchrun --nnodes 2` across two containers (gloo over the network): the weights of two processes here, and of
  one process to rounding.
In each, a machine whose code differs (one comment in hndsr/, first on its PYTHONPATH) is refused with a message
that names it, and nothing of it counts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from safetensors.torch import load_file

from hndsr import provenance
from tests.compare import assert_same_files
from tests.containers import Container, docker
from tests.scaleout.conftest import altered, env, hndsr, write_params

pytestmark = [pytest.mark.scaleout, pytest.mark.container]

OUTPUTS = ("train.parquet", "val.parquet", "test.parquet", "manifest.json")
DIFFERENT = re.compile(r"runs other software than (?P<than>.+?) \(code (?P<there>\w+) there, (?P<here>\w+) here\)")


class Machines:
    """Containers of the worker image on one network, each a machine named by its network alias, with `shared`
    mounted at the same path and this host's user (so what they write here is ours)."""

    def __init__(self, image: str, network: str, shared: Path) -> None:
        self.image, self.network, self.shared = image, network, shared
        self.started: list[Container] = []

    def start(self, alias: str, *command: str, workdir: Path | None = None, code: Path | None = None,
              **variables: str) -> Container:
        options = ["--network", self.network, "--network-alias", alias, "--hostname", alias,
                   "--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{self.shared}:{self.shared}",
                   "-w", str(workdir or self.shared)]
        if code is not None:  # this machine's other code, ahead of the installed package
            options += ["-v", f"{code}:/other-code:ro", "-e", "PYTHONPATH=/other-code"]
        # HOME: a uid the image does not know (a non-root user of this host) would have none it may write to
        machine = Container(self.image, env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
                                             **variables},
                            options=tuple(options), args=command)
        self.started.append(machine)
        return machine

    def remove(self) -> None:
        for machine in self.started:
            machine.remove()


@pytest.fixture
def network():
    name = f"hndsr-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    try:
        yield name
    finally:
        docker("network", "rm", name, check=False)


def expect_refused(machine: Container, than: str, timeout: float = 300) -> str:
    status, logs = machine.wait(timeout), machine.logs()
    assert status != 0, logs[-3000:]
    found = DIFFERENT.search(logs)
    assert found, logs[-3000:]
    assert found["than"] == than and found["there"] != found["here"], found.group(0)
    assert provenance.code_hash() in (found["there"], found["here"])  # the other one is the altered copy's
    return logs


def runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def trial_metrics(uri: str, experiment: str) -> dict[int, dict[str, float]]:
    """Each trial's final metrics in a tracking store, by trial number, without timings."""
    return {int(r.data.tags["trial"]): {k: v for k, v in r.data.metrics.items() if not re.search("second|_s$|per_s", k)}
            for r in runs(uri, experiment) if "trial" in r.data.tags}


@pytest.mark.timeout(900)  # with a cold cache: the worker image (about 2 min) and the stack
def test_a_sweep_across_containers_on_the_stack_gives_one_process_results(project, tmp_path, worker_image, stack):
    budget = 4
    sweep = {"n_trials": budget, "iterations": 160, "eval_every": 80, "search": {}}
    experiment = f"sweep-{uuid.uuid4().hex[:8]}"  # its own in the session's stack
    single = tmp_path / "single"
    shutil.copytree(project, single)
    write_params(single, train={"experiment": experiment}, train_autoencoder=sweep)
    alone = hndsr(single, "train", "autoencoder")
    assert alone.returncode == 0, alone.stderr[-3000:]

    machines = Machines(worker_image, stack.network(), tmp_path)
    database = f"optuna_{uuid.uuid4().hex[:8]}"
    try:
        made = machines.start("db-admin", "python", "-c", "import psycopg; psycopg.connect('postgresql://mlflow:"
                              f"mlflow@postgres:5432/mlflow', autocommit=True).execute('CREATE DATABASE {database}')")
        assert made.wait(120) == 0, made.logs()
        write_params(project, train={"experiment": experiment,
                                     "study_storage": f"postgresql://mlflow:mlflow@postgres:5432/{database}"},
                     train_autoencoder=sweep)
        tracking = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
        # the workers wait for the sweep to open; one of them runs other code
        worker = machines.start("node2", "hndsr", "train", "autoencoder", "--worker", "--wait", "180",
                                workdir=project, **tracking)
        other = machines.start("node3", "hndsr", "train", "autoencoder", "--worker", "--wait", "180",
                               workdir=project, code=altered(tmp_path / "other"), **tracking)
        stage = machines.start("node1", "hndsr", "train", "autoencoder", workdir=project, **tracking)
        assert stage.wait(600) == 0, stage.logs()[-4000:]
        # the worker ran its share, then waits for the next sweep (up to --wait): stopped here
        ran = wait_logged(worker, r"no queued trial left; ran (\d+) here", 120)
        assert int(ran[1]) >= 1
        refused = expect_refused(other, "this worker", 120)
        assert "the stage that opened autoencoder-" in refused
        stage_logs = stage.logs()
    finally:
        machines.remove()

    # the same trials as one process here: each trial's metrics, the stage's metrics and best weights
    remote = trial_metrics(stack.url("MLFLOW_PORT"), experiment)
    assert sorted(remote) == list(range(budget))
    assert remote == trial_metrics(f"sqlite:///{single / 'mlflow.db'}", experiment)
    [stage_run] = [r for r in runs(stack.url("MLFLOW_PORT"), experiment) if "sweep.workers" in r.data.tags]
    workers = {w.split(":")[0] for w in stage_run.data.tags["sweep.workers"].split(", ")}
    assert workers == {"node1", "node2"}, stage_logs[-3000:]  # both machines ran trials, the other none
    assert_same_files(single, project, ["metrics/autoencoder.json", "models/autoencoder/model.safetensors"])


def test_etl_on_a_dask_cluster_in_containers_writes_the_bytes_of_one_process(etl_project, tmp_path, worker_image,
                                                                             network):
    shared = tmp_path.parent.parent  # pytest's base temporary folder: the raw images, the project and tmp_path
    assert etl_project.is_relative_to(shared)
    machines = Machines(worker_image, network, shared)
    try:
        scheduler = machines.start("scheduler", "dask", "scheduler", "--port", "8786", "--no-dashboard")
        for node in ("node1", "node2"):
            machines.start(node, "dask", "worker", "tcp://scheduler:8786", "--nthreads", "1", "--no-dashboard",
                           "--name", node)
        wait_logged(scheduler, "Register worker", 120, count=2)
        driver = machines.start("driver", "hndsr", "etl", "--params", str(etl_project / "params.yaml"), "--out",
                                str(tmp_path / "cluster"), "--cluster", "tcp://scheduler:8786",
                                workdir=etl_project)
        status, logs = driver.wait(300), driver.logs()
        assert status == 0, logs[-4000:]
        assert "on the Dask cluster at tcp://scheduler:8786 (2 workers)" in logs
        assert_same_files(etl_project / "data" / "processed", tmp_path / "cluster", OUTPUTS)

        # a third worker with other code joins: the driver refuses the cluster before any task, naming it
        machines.start("node3", "dask", "worker", "tcp://scheduler:8786", "--nthreads", "1", "--no-dashboard",
                       "--name", "node3", code=altered(tmp_path / "other"))
        wait_logged(scheduler, "Register worker", 120, count=3)
        again = machines.start("driver2", "hndsr", "etl", "--params", str(etl_project / "params.yaml"), "--out",
                               str(tmp_path / "refused"), "--cluster", "tcp://scheduler:8786", workdir=etl_project)
        logs = expect_refused(again, "this machine")
        assert re.search(r"the Dask worker tcp://[\d.]+:\d+ runs other software", logs), logs[-3000:]
        assert not (tmp_path / "refused" / "manifest.json").exists()
    finally:
        machines.remove()


def wait_logged(machine: Container, pattern: str, timeout: float, count: int = 1) -> re.Match:
    """The last of the first `count` matches of `pattern` in the container's logs, once there are as many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(re.finditer(pattern, machine.logs()))
        if len(found) >= count:
            return found[count - 1]
        time.sleep(0.5)
    pytest.fail(f"{pattern!r} not logged {count} time(s) in {timeout} s: {machine.logs()[-3000:]}")


def _weights(project: Path) -> dict:
    return load_file(str(project / "models" / "diffusion" / "model.safetensors"))


@pytest.mark.timeout(900)
def test_torchrun_across_two_containers_trains_what_processes_here_do(project, tmp_path, worker_image, network):
    for stage in ("autoencoder", "operator"):
        result = hndsr(project, "train", stage, "--params", "params.yaml")
        assert result.returncode == 0, result.stderr[-3000:]
    single, pair = tmp_path / "single", tmp_path / "pair"
    for folder in (single, pair):
        shutil.copytree(project, folder)
    alone = hndsr(single, "train", "diffusion", "--params", "params.yaml")
    assert alone.returncode == 0, alone.stderr[-3000:]
    here = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hndsr.cli",
            "train", "diffusion", "--params", "params.yaml"]
    two = subprocess.run(here, cwd=pair, env=env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    machines = Machines(worker_image, network, tmp_path)

    def node(rank: int, folder: Path, **extra) -> Container:
        return machines.start(f"node{rank}", "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                              str(rank), "--master-addr", "node0", "--master-port", "29500", "-m", "hndsr.cli", "train",
                              "diffusion", "--params", "params.yaml", workdir=folder, GLOO_SOCKET_IFNAME="eth0",
                              **extra)

    try:
        nodes = [node(0, project), node(1, project)]
        statuses = [n.wait(600) for n in nodes]
        logs = [n.logs() for n in nodes]
        assert statuses == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        assert "rank 0 of 2" in logs[0] and "rank 1 of 2 (local rank 0, backend gloo)" in logs[1]
        assert logs[0].count("train diffusion: best objective") == 1 and "best objective" not in logs[1]
        for machine in nodes:
            machine.remove()
        machines.started.clear()

        refused = tmp_path / "refused"
        shutil.copytree(single, refused)
        other = altered(tmp_path / "other")
        nodes = [node(0, refused), node(1, refused, code=other)]
        expect_refused(nodes[0], "rank 0 (on node0)")
        logs = expect_refused(nodes[1], "rank 0 (on node0)")
        assert "rank 1 (on node1) runs other software" in logs
    finally:
        machines.remove()

    # two processes on two machines: the bytes of two processes here, and one process's weights to rounding
    containers, local, one = _weights(project), _weights(pair), _weights(single)
    assert all(np.array_equal(containers[k].numpy(), v.numpy()) for k, v in local.items())
    assert max(float((containers[k] - one[k]).abs().max()) for k in one) < 1e-5
    assert json.loads((refused / "metrics" / "diffusion.json").read_text()) == \
        json.loads((single / "metrics" / "diffusion.json").read_text())  # the refused run changed nothing
