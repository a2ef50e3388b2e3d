"""Shared DVC remote on S3: the pipeline's outputs pushed from one clone to a local S3 server process and pulled
into another clone, where `dvc repro` then has nothing to do."""

import subprocess
import uuid

import pytest

from tests.test_dvc_pipeline import _run, _shrink
from tests.test_dvc_pipeline import project as pipeline_project

project = pipeline_project  # the fixture (a git repository of the pipeline), not the scale-out ETL copy

pytestmark = pytest.mark.scaleout

OUTPUTS = ["data/processed", "models/autoencoder", "models/operator", "models/diffusion"]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for folder in OUTPUTS for p in sorted((root / folder).rglob("*")) if p.is_file()}


def test_push_to_s3_and_pull_into_another_clone_leaves_nothing_to_reproduce(project, tmp_path, s3_server):
    _shrink(project)
    result = _run(["dvc", "repro"], project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    bucket = f"dvc-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = s3_server.env()
    env.pop("AWS_ENDPOINT_URL")  # the remote's own setting names the endpoint, as for MinIO or any S3-compatible store
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # aiobotocore wants a readable profile file
        env.pop(name)
    for args in (["dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvc"],
                 ["dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint],
                 ["git", "add", "-A"],
                 ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "pipeline run"]):
        done = _run(args, project)
        assert done.returncode == 0, done.stdout + done.stderr
    pushed = _run(["dvc", "push"], project, **env)
    assert pushed.returncode == 0, pushed.stdout[-3000:] + pushed.stderr[-3000:]
    stored = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="dvc/")
    assert stored["KeyCount"] > 0

    clone = tmp_path / "clone"
    assert subprocess.run(["git", "clone", "-q", str(project), str(clone)], capture_output=True).returncode == 0
    assert not (clone / "data" / "processed").exists()  # git holds none of the outputs
    pulled = _run(["dvc", "pull"], clone, **env)
    assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]
    assert _files(clone) == _files(project)

    status = _run(["dvc", "status"], clone, **env)
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout
    again = _run(["dvc", "repro"], clone, **env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date." in again.stdout
