"""The commit recorded with every run and version: `-dirty` for uncommitted code, not for what the pipeline writes;
and the software a machine runs, which every machine of one job must share."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from hndsr.provenance import PACKAGES, SoftwareMismatch, check_same_software, git_commit, software
from tests.conftest import REPO


def _git(folder, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def test_pipeline_outputs_do_not_make_the_commit_dirty_but_code_does(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: x\n    outs:\n      - reports/grid.png\n"
                                       "    metrics:\n      - metrics/eval.json:\n          cache: false\n")
    for path, text in {"dvc.lock": "a", "reports/grid.png": "a", "metrics/eval.json": "{}", "code.py": "x = 1"}.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "init")
    head = _git(tmp_path, "rev-parse", "HEAD")
    monkeypatch.chdir(tmp_path)
    assert git_commit() == head
    for path in ("dvc.lock", "reports/grid.png", "metrics/eval.json"):  # what `dvc repro` rewrites
        (tmp_path / path).write_text("changed by the pipeline")
    assert git_commit() == head
    (tmp_path / "code.py").write_text("x = 2")
    assert git_commit() == f"{head}-dirty"


def _software_of(path) -> dict:
    """`software()` in a new interpreter whose first import path is `path` (another machine's copy of the code)."""
    out = subprocess.run([sys.executable, "-c", "import json; from hndsr import provenance; "
                          "print(json.dumps([provenance.software(), provenance.__file__]))"],
                         env={"PYTHONPATH": str(path), "PATH": ""}, cwd=path, capture_output=True, text=True,
                         check=True)
    found, module = json.loads(out.stdout)
    assert module.startswith(str(path))
    return found


def test_the_same_code_anywhere_has_one_identity_and_any_edit_another(tmp_path):
    here = software()
    assert set(here) == {"hndsr", "code", "python", "torch", "numpy"} and "+" not in here["torch"]
    copy = tmp_path / "copy"
    for package in PACKAGES:  # as a wheel installs it: the same files elsewhere, without caches
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert _software_of(copy) == here
    with (copy / "training" / "ema.py").open("a") as file:
        file.write("# one comment\n")
    other = _software_of(copy)
    assert other["code"] != here["code"] and {k: v for k, v in other.items() if k != "code"} == \
        {k: v for k, v in here.items() if k != "code"}

    check_same_software("the Dask worker tcp://10.0.0.3:4000", dict(here))  # the same: nothing raised
    with pytest.raises(SoftwareMismatch) as refused:
        check_same_software("the Dask worker tcp://10.0.0.3:4000", {**other, "torch": "2.12.0"})
    message = str(refused.value)
    assert message.startswith("the Dask worker tcp://10.0.0.3:4000 runs other software than this machine (code "
                              f"{other['code']} there, {here['code']} here; torch 2.12.0 there, {here['torch']} here)")
    assert "same commit" in message and refused.value.exit_code == 1
