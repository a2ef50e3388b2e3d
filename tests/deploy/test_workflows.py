"""The CI workflows executed (marker `workflows`): every job of .github/workflows/ci.yml and promote.yml run step
by step as a runner would (tests/workflow_runner.py), in a clone of a repository whose commits hold real pipeline
results: `promote.yml` against a tracking server on PostgreSQL (artifacts on a local S3 server) and a DVC remote on
that S3 server, as the team's CI runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.tracking import copy_candidate, postgres_s3_mlflow_server, run
from tests.workflow_runner import Runner, load, step_name

pytestmark = [pytest.mark.workflows, pytest.mark.slow]
WORKFLOWS = REPO / ".github" / "workflows"
OUTPUT_STAGES = ["etl", "train_autoencoder", "train_operator", "train_diffusion", "evaluate"]
# The one step not run as written, and why: it is this suite. It runs with pytest collecting only, so `make test`
# still sets up from the lock with the CPU torch spec, installs the tools and imports every test module.
SUITE_STEP = ("ci.yml", "test", "make test (CPU-only torch)")
POSTGRES_STAND_IN = "this machine's PostgreSQL on 127.0.0.1:5432 (trust auth), as the job's service maps it"


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.org", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def working_tree_files() -> list[str]:
    """The files a clone of this working tree has: tracked, and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def s3_dvc(s3_server):
    bucket = f"ci-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return {"url": f"s3://{bucket}/dvc", "endpoint": s3_server.endpoint}


@pytest.fixture(scope="module")
def origin(tmp_path_factory, candidates, s3_dvc):
    """The repository CI checks out: this working tree, then one commit per pipeline result (good, a worse one,
    another good one), each with dvc.lock naming the outputs `dvc push` put on the S3 remote."""
    root = tmp_path_factory.mktemp("origin") / "repo"
    root.mkdir()
    for name in working_tree_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    git("init", "-q", "-b", "main", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "code", cwd=root)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    for args in (["dvc", "remote", "add", "--local", "-d", "s3", s3_dvc["url"]],
                 ["dvc", "remote", "modify", "--local", "s3", "endpointurl", s3_dvc["endpoint"]]):
        assert run(args, root).returncode == 0
    model_name = f"hndsr-ci-{uuid.uuid4().hex[:8]}"
    commits = {}
    for candidate in ("good", "bad", "good2"):
        staging = copy_candidate(candidates[candidate], root.parent / f"staging-{candidate}", model_name)
        for name in ("data", "models", "metrics"):
            shutil.rmtree(root / name, ignore_errors=True)
            shutil.copytree(staging / name, root / name)
        for path in (candidates["good"] / "metrics").iterdir():  # good2 shares good's autoencoder and its metrics
            if not (root / "metrics" / path.name).exists():
                shutil.copy(path, root / "metrics" / path.name)
        shutil.copy(staging / "params.yaml", root / "params.yaml")
        for args in (["dvc", "commit", "-f", *OUTPUT_STAGES], ["dvc", "push"]):
            done = run(args, root, env=env)
            assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        git("add", "-A", cwd=root)
        git("commit", "-qm", f"pipeline result: {candidate}", cwd=root)
        commits[candidate] = git("rev-parse", "HEAD", cwd=root)
    return {"path": root, "commits": commits, "model_name": model_name}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, s3_server):
    """The team's tracking server: PostgreSQL for runs and the registry, S3 (local) for artifacts."""
    with postgres_s3_mlflow_server(tmp_path_factory.mktemp("ci-tracking"), s3_server, "hndsr_ci") as (server, _):
        yield server


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    root = tmp_path_factory.mktemp("runner")
    extra = []
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        # GitHub's runners have the compose v2 client; here Debian's docker-compose (v1) stands in for it.
        assert shutil.which("docker-compose"), "no compose client: `make tools` installs docker-compose"
        shim = root / "shims"
        shim.mkdir()
        (shim / "docker").write_text(f'#!/bin/sh\nif [ "$1" = compose ]; then shift; exec docker-compose "$@"; fi\n'
                                     f'exec {shutil.which("docker")} "$@"\n')
        (shim / "docker").chmod(0o755)
        extra.append(str(shim))
    return Runner(root, extra_path=extra)


@pytest.fixture(scope="module")
def checkout(origin, tmp_path_factory):
    """One clone for every job, reset to the commit under test before each (git clean keeps only .venv: the
    runner's warm cache; the first job that needs the venv builds it from the lock for real)."""
    path = tmp_path_factory.mktemp("workspace") / "repo"
    git("clone", "-q", str(origin["path"]), str(path), cwd=path.parent)

    def at(commit: str) -> Path:
        git("checkout", "-qf", commit, cwd=path)
        git("clean", "-qfdx", "-e", ".venv", cwd=path)
        return path

    return at


def test_every_action_and_service_has_a_stand_in_and_every_run_step_runs():
    """What the job tests below run, listed: a new action or service in a workflow fails here first."""
    from tests.workflow_runner import STAND_INS

    for workflow in ("ci.yml", "promote.yml"):
        for job_name, job in load(WORKFLOWS / workflow)["jobs"].items():
            for step in job["steps"]:
                if "uses" in step:
                    assert step["uses"].split("@")[0] in STAND_INS, (workflow, job_name, step["uses"])
            assert set(job.get("services", {})) <= {"postgres"}, (workflow, job_name)
    test_job = load(WORKFLOWS / "ci.yml")["jobs"]["test"]
    assert SUITE_STEP[2] in [step_name(s) for s in test_job["steps"]]


@pytest.mark.timeout(900)  # the test job's set-up from the lock (about 2 min) and the collection
def test_ci_workflow_jobs_pass(runner, checkout, origin):
    workspace = checkout(origin["commits"]["good"])
    results = {}
    for job in ("lint", "lock", "compose", "test"):
        results[job] = runner.run_job(
            WORKFLOWS / "ci.yml", job, workspace, services={"postgres": POSTGRES_STAND_IN},
            step_env={SUITE_STEP[2]: {"PYTEST_ADDOPTS": "--collect-only -q"}})
        assert results[job].conclusion == "success", results[job].log()
    assert "All checks passed" in results["lint"].step("Run ruff check .").output
    collected = results["test"].step(SUITE_STEP[2]).output
    counted = re.search(r"^(\d+) tests collected in .*$", collected, re.MULTILINE)
    assert counted and int(counted.group(1)) > 400 and "error" not in counted.group(0), collected[-3000:]
    assert any("setup-python" in s for s in results["test"].stand_ins)
    assert any(s.startswith("service postgres") for s in results["test"].stand_ins)
    print("stood in:", *sorted({s for r in results.values() for s in r.stand_ins}), sep="\n  ")
    print(f"not run as written: {SUITE_STEP}: pytest collects only (the suite itself is this run)")


def production(tracking, name: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking.uri).get_model_version_by_alias(name, "production").version


@pytest.mark.timeout(900)
def test_promote_workflow_gates_rejects_and_brings_back_a_rolled_back_version(runner, checkout, origin, tracking,
                                                                              s3_dvc):
    workflow = WORKFLOWS / "promote.yml"
    name = origin["model_name"]
    secrets = {"MLFLOW_TRACKING_URI": tracking.uri, "DVC_REMOTE_URL": s3_dvc["url"],
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_ENDPOINT_URL": s3_dvc["endpoint"]}

    def gate(candidate: str, **inputs):
        workspace = checkout(origin["commits"][candidate])
        result = runner.run_job(workflow, "gate", workspace, secrets=secrets, inputs=inputs)
        report = workspace / "reports" / "promotion.json"
        return result, (json.loads(report.read_text()) if report.exists() else None), workspace

    # The secrets are checked first: without the tracking server's address the job stops, saying which to set.
    bare = runner.run_job(workflow, "gate", checkout(origin["commits"]["good"]), secrets={})
    assert bare.conclusion == "failure" and "set the MLFLOW_TRACKING_URI repository secret" in bare.log()
    assert bare.step("Run the gate").outcome == "skipped"

    first, report, _ = gate("good")  # a push of a new pipeline result
    assert first.conclusion == "success", first.log()
    assert report["decision"] == "promoted" and production(tracking, name) == report["version"]
    assert "promoted" in first.summary.lower()
    assert (first.artifacts / "promotion-report" / "promotion.json").is_file()
    good_version = report["version"]

    worse, report, _ = gate("bad")
    assert worse.conclusion == "failure" and worse.step("Run the gate").outcome == "failure", worse.log()
    assert worse.step("Registry status").outcome == "success"  # if: always()
    assert report["decision"] == "rejected" and production(tracking, name) == good_version
    assert "rejected" in worse.summary.lower()

    allowed, report, _ = gate("bad", allow_reject=True)
    assert allowed.conclusion == "success", allowed.log()
    assert report["decision"] == "rejected" and production(tracking, name) == good_version

    second, report, workspace = gate("good2")
    assert second.conclusion == "success", second.log()
    assert report["decision"] == "promoted"
    second_version = report["version"]
    assert production(tracking, name) == second_version != good_version

    # An operator rolls the second one back; a later dispatch brings it back only with a reason.
    back = run(["hndsr", "registry", "rollback", "--params", "params.yaml", "--reason", "seams along coastlines"],
               workspace, env={"MLFLOW_TRACKING_URI": tracking.uri})
    assert back.returncode == 0, back.stdout + back.stderr
    assert production(tracking, name) == good_version

    unexplained, _, _ = gate("good2", version=second_version)
    assert unexplained.conclusion == "failure" and "--reason" in unexplained.step("Run the gate").output
    assert production(tracking, name) == good_version

    returned, report, _ = gate("good2", version=second_version, reason="blend window fixed in v1.2")
    assert returned.conclusion == "success", returned.log()
    assert report["requested"] == {"version": second_version, "reason": "blend window fixed in v1.2"}  # this job's
    assert report["decision"] == "promoted", [c for c in report["checks"] if not c["passed"]]
    assert production(tracking, name) == second_version
    assert f"v{second_version}" in returned.summary or second_version in returned.summary
    print("stood in:", *sorted(set(returned.stand_ins)), sep="\n  ")
