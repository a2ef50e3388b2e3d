"""The monitoring kit (deploy/monitoring): promtool checks the Prometheus config and rules and runs the rules'
unit tests (every alert, firing and not), and every metric the rules and the dashboard use is one a running
`hndsr serve` exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "deploy" / "monitoring"
RULES = KIT / "rules" / "hndsr.rules.yml"
DASHBOARD = KIT / "grafana" / "dashboards" / "hndsr-serving.json"
SERVER_METRIC = re.compile(r"\b((?:hndsr|process|python)_[a-z_]+)\b")


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=KIT, timeout=120)


def test_promtool_accepts_the_config_and_the_rules():
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", "rules/hndsr.rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}
    tests = yaml.safe_load((KIT / "rules" / "hndsr.rules.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fires == alerts and silent == alerts, (alerts - fires, alerts - silent)
    result = promtool("test", "rules", "rules/hndsr.rules.test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def used_metrics() -> set[str]:
    expressions = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return {name for expr in expressions for name in SERVER_METRIC.findall(expr)}


@pytest.mark.slow
def test_the_rules_and_the_dashboard_use_only_metrics_the_server_exports(tmp_path):
    from tests.serving.test_server import Server, png, post, write_model

    s = Server({"MODEL_URI": str(write_model(tmp_path / "models", seed=0))}, tmp_path)
    s.wait_ready()
    try:
        assert post(s.url, png(16, 16), steps="1").status_code == 200
        text = httpx.get(f"{s.url}/metrics").text
    finally:
        s.stop()
    check_only_exported_metrics_are_used(text)


def check_only_exported_metrics_are_used(text: str) -> None:
    """Every metric a rule or a dashboard panel names is in `text`, a server's /metrics (here, and the serving
    container's in tests/deploy/test_stack.py)."""
    exported = set()
    for family in text_string_to_metric_families(text):
        exported |= {family.name, *(sample.name for sample in family.samples)}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [])
        exported |= {family.name + suffix for suffix in suffixes}  # families with no labelled child yet
    used = used_metrics()
    assert {"hndsr_requests_total", "hndsr_request_seconds_bucket", "hndsr_ready", "hndsr_model_info",
            "hndsr_canary_backouts_total", "process_resident_memory_bytes"} <= used
    assert used - exported == set(), f"used by the rules or the dashboard but not exported: {used - exported}"
