"""The Kubernetes manifests (deploy/k8s), built with kustomize (`kubectl kustomize`) and validated offline
against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors), then checked for
what the README promises: probes, drain-aware grace period, non-root, GPU limit, settings and secrets."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest Kubernetes the manifests are checked against


def build(target: str) -> dict[tuple[str, str], dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with kustomize) is missing: `make test` installs it (Debian package kubernetes-client)")
    result = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(result.stdout) if doc}


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_manifests_build_and_validate_against_the_kubernetes_schemas(target):
    import kubernetes_validate

    documents = build(target)
    assert {kind for kind, _ in documents} == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                               "PodDisruptionBudget"}
    for document in documents.values():
        for version in VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)  # raises with the field at fault


def test_the_deployment_keeps_the_servers_promises():
    base, gpu = build("base"), build("overlays/gpu")
    config = base["ConfigMap", "hndsr-config"]["data"]
    for documents in (base, gpu):
        pod = documents["Deployment", "hndsr-serve"]["spec"]["template"]["spec"]
        serve = pod["containers"][0]
        assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert pod["terminationGracePeriodSeconds"] > float(config["HNDSR_DRAIN_S"]) + 10
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        assert serve["securityContext"]["allowPrivilegeEscalation"] is False
        assert serve["resources"]["requests"]["cpu"] and serve["resources"]["requests"]["memory"]
        sources = {kind: ref["name"] for source in serve["envFrom"] for kind, ref in source.items()}
        assert sources == {"configMapRef": "hndsr-config", "secretRef": "hndsr-secrets"}
        service = documents["Service", "hndsr-serve"]["spec"]
        assert service["selector"] == documents["Deployment", "hndsr-serve"]["spec"]["selector"]["matchLabels"]
        assert documents["PodDisruptionBudget", "hndsr-serve"]["spec"]["minAvailable"] == 1
    gpu_serve = gpu["Deployment", "hndsr-serve"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu_serve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "HNDSR_DEVICE", "value": "cuda"} in gpu_serve["env"]
    assert "nvidia.com/gpu" not in base["Deployment", "hndsr-serve"]["spec"]["template"]["spec"]["containers"][0][
        "resources"].get("limits", {})
