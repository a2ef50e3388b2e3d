"""The tracking stack up (marker `container`): mlflow/docker-compose.yml with the local override
(mlflow/docker-compose.local.yml: the same software built from Debian's packages and PyPI), brought up by
deploy/images/stack.sh as the README says. The pipeline's promote stage registers and promotes into it, `serve`
loads `production` from it and answers, Prometheus scrapes `serve` and loads the alert rules, and `down -v`
leaves nothing behind. One stack for the module, under its own compose project name and free ports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import uuid

import httpx
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, free_port
from tests.containers import docker, require_engine
from tests.deploy.test_monitoring import RULES, check_only_exported_metrics_are_used
from tests.tracking import copy_candidate, run

pytestmark = [pytest.mark.container, pytest.mark.slow]
STACK = REPO / "deploy" / "images" / "stack.sh"


class Stack:
    def __init__(self, serve_image: str) -> None:
        self.project = f"hndsr-test-{uuid.uuid4().hex[:8]}"
        self.ports = {name: free_port() for name in ("MLFLOW_PORT", "SERVE_PORT", "MINIO_PORT",
                                                     "MINIO_CONSOLE_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")}
        self.env = {**self.ports, "HNDSR_SERVE_IMAGE": serve_image}
        self.down = False

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
               **{k: str(v) for k, v in self.env.items()}}
        result = subprocess.run([str(STACK), "-p", self.project, "--profile", "monitoring", *args], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (f"stack.sh {' '.join(args)}: "
                                            f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def url(self, port: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: docker(*command, "--filter", label, "-q").stdout.split()
                for kind, command in {"containers": ("ps", "-a"), "volumes": ("volume", "ls"),
                                      "networks": ("network", "ls")}.items()}


def wait_for(url: str, timeout: float, what: str, accept=lambda r: r.status_code == 200) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=5)
            if accept(last):
                return last
        except httpx.HTTPError as error:
            last = error
        time.sleep(1)
    pytest.fail(f"{what} not ready in {timeout} s: {last!r}")


@pytest.fixture(scope="module")
def stack(serve_image):
    require_engine()
    running = Stack(serve_image)
    try:
        running.compose("up", "-d", "postgres", "minio", "minio-init", "mlflow")
        wait_for(f"{running.url('MLFLOW_PORT')}/health", 180, "the MLflow server")
        yield running
    finally:
        if not running.down:  # the test brings it down itself and checks; this is for a test that failed first
            print(running.compose("logs", "--tail", "40", check=False).stdout[-6000:])
            running.compose("down", "-v", "--remove-orphans", timeout=300, check=False)


@pytest.mark.timeout(900)  # with a cold cache: the local images (about 3 min) and the candidates (2 min)
def test_the_stack_registers_serves_and_is_scraped_then_down_leaves_nothing(stack, candidates, realsat,
                                                                           tmp_path):
    uri = stack.url("MLFLOW_PORT")
    # The pipeline's promote stage (dvc.yaml's command) with MLFLOW_TRACKING_URI at the stack.
    project = copy_candidate(candidates["good"], tmp_path / "project", "hndsr")
    promote = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["promote"]["cmd"].split()
    promoted = run(promote, project, env={"MLFLOW_TRACKING_URI": uri})
    assert promoted.returncode == 0, promoted.stdout[-2000:] + promoted.stderr[-3000:]
    report = json.loads((project / "reports" / "promotion.json").read_text())
    assert report["decision"] == "promoted", report
    # The weights went through the server's artifact proxy into the S3 store, never pickled.
    listed = stack.compose("exec", "-T", "minio", "python", "-c",
                           "import boto3; s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:9000', "
                           "region_name='us-east-1', aws_access_key_id='x', aws_secret_access_key='x'); "
                           "print('\\n'.join(o['Key'] for o in s3.list_objects_v2(Bucket='mlflow-artifacts')"
                           ".get('Contents', [])))").stdout
    assert "model.safetensors" in listed and ".pkl" not in listed

    stack.compose("up", "-d", "--no-build", "serve")
    serve = stack.url("SERVE_PORT")
    wait_for(f"{serve}/readyz", 240, "serve")
    with Image.open(realsat / "landsat8_grenada.png") as img:
        buffer = io.BytesIO()
        img.convert("RGB").crop((0, 0, 96, 96)).save(buffer, format="PNG")
    answer = httpx.post(f"{serve}/v1/super-resolve", files={"file": ("in.png", buffer.getvalue())},
                        data={"scale": "4"}, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-version"] == report["version"]
    assert Image.open(io.BytesIO(answer.content)).size == (384, 384)
    check_only_exported_metrics_are_used(httpx.get(f"{serve}/metrics", timeout=10).text)

    stack.compose("up", "-d", "--no-build", "prometheus")
    prometheus = stack.url("PROMETHEUS_PORT")
    wanted = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}
    rules = wait_for(f"{prometheus}/api/v1/rules", 120, "Prometheus's rules",
                     lambda r: r.status_code == 200 and r.json()["data"]["groups"]).json()
    loaded = {rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]}
    assert wanted <= loaded, wanted - loaded
    targets = wait_for(f"{prometheus}/api/v1/targets", 120, "the scrape of serve",
                       lambda r: any(t["health"] == "up" for t in r.json()["data"]["activeTargets"])).json()
    scraped = [t for t in targets["data"]["activeTargets"] if t["labels"]["job"] == "hndsr"]
    assert scraped and scraped[0]["health"] == "up" and scraped[0]["scrapeUrl"] == "http://serve:8000/metrics"
    ready = wait_for(f"{prometheus}/api/v1/query?query=hndsr_ready", 60, "hndsr_ready in Prometheus",
                     lambda r: r.json()["data"]["result"]).json()
    assert ready["data"]["result"][0]["value"][1] == "1"

    print(stack.compose("logs", "--tail", "30").stdout[-6000:])
    stack.compose("down", "-v", "--remove-orphans", timeout=300)
    stack.down = True
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
