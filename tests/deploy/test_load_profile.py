"""The locust load profile (deploy/load/locustfile.py) run headless against a real `hndsr serve`."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_the_load_profile_runs_its_whole_mix_without_failures(tmp_path):
    from tests.serving.test_server import Server, write_model

    s = Server({"MODEL_URI": str(write_model(tmp_path / "models", seed=0)), "HNDSR_API_KEY": "load-test-key"},
               tmp_path)
    s.wait_ready()
    try:
        result = subprocess.run(
            [str(BIN / "locust"), "-f", str(REPO / "deploy" / "load" / "locustfile.py"), "--host", s.url,
             "--headless", "-u", "4", "-r", "4", "-t", "12s", "--csv", str(tmp_path / "load"), "--only-summary"],
            capture_output=True, text=True, timeout=180, cwd=tmp_path,
            env={"PATH": f"{BIN}:/usr/bin:/bin", "HNDSR_API_KEY": "load-test-key", "HOME": str(tmp_path)})
    finally:
        s.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (tmp_path / "load_stats.csv").open() as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert int(rows["Aggregated"]["Request Count"]) >= 8 and int(rows["Aggregated"]["Failure Count"]) == 0
    assert "128 px x4 default steps" in rows  # the most frequent task ran
