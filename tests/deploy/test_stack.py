"""The tracking stack up (marker `container`): mlflow/docker-compose.yml with the local override
(mlflow/docker-compose.local.yml: the same software built from Debian's packages and PyPI), brought up by
deploy/images/stack.sh as the README says. The pipeline's promote stage registers and promotes into it, `serve`
loads `production` from it and answers, and Prometheus scrapes `serve` and loads the alert rules. The stack is the
session's (tests/containers.py `stack`: under its own compose project name and free ports), whose `down -v` at the
end of the session must leave nothing behind."""

from __future__ import annotations

import io
import json

import httpx
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO
from tests.containers import wait_for
from tests.deploy.test_monitoring import RULES, check_only_exported_metrics_are_used
from tests.tracking import copy_candidate, run

pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.mark.timeout(900)  # with a cold cache: the local images (about 3 min) and the candidates (2 min)
def test_the_stack_registers_serves_and_is_scraped(stack, candidates, realsat,
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

    stack.compose("stop", "prometheus", "serve")  # the stack stays up for the session's other tests
