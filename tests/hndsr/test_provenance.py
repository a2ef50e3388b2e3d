"""The commit recorded with every run and version: `-dirty` for uncommitted code, not for what the pipeline writes."""

from __future__ import annotations

import subprocess

from hndsr.provenance import git_commit


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
