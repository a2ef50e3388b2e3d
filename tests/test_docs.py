"""The documentation site (docs/, mkdocs.yml): `make docs` builds it with no warning (strict: a broken link, anchor
or a page missing from the nav fails), a broken link does fail it, the reference pages come from the code, and every
shell block says how it is checked: `<!-- runs -->` (this file runs it), `<!-- run by tests/FILE::TEST ... -->`
(that test runs the same commands) or `<!-- not run: WHY -->`. The README stays short and links into the site."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"
MARKER = re.compile(r"<!--\s*(runs|run by (\S+?)::(\w+)|not run: (.+?))\s*(\(.*?\))?\s*-->", re.S)
SHELLS = ("bash", "sh", "shell", "console", "python")


def blocks() -> list[tuple[Path, int, str, str]]:
    """(page, line, language, body) of every fenced block in the docs, plus the comment right above it ('' if none)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S):
            before = text[: match.start()].rstrip()
            comment = before[before.rfind("<!--"):] if before.endswith("-->") else ""
            found.append((page, text[: match.start()].count("\n") + 1, match.group(1), match.group(2), comment))
    return found


def shell_blocks():
    return [b for b in blocks() if b[2] in SHELLS]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NO_MKDOCS_2_WARNING": "1"}


def test_make_docs_builds_the_site_with_no_warning(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(["make", "docs", f"SITE_DIR={site}"], cwd=REPO, capture_output=True, text=True,
                          env=env(), timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert not re.search(r"^(WARNING|ERROR)\s+-", output, re.M), output[-4000:]  # MkDocs' own lines
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    assert [next(iter(item)) for item in nav] == ["Home", "Getting started", "Tutorials", "How-to guides",
                                                  "Reference", "Explanation"]
    for page in ("getting-started", "reference/cli", "reference/settings", "reference/params",
                 "reference/http-api", "reference/parquet", "reference/manifest", "reference/metrics"):
        assert (site / page / "index.html").is_file(), page
    # Generated from the code: a setting, a params key, a route, a column and a metric as the code names them.
    from inference.settings import EngineSettings
    from pipeline.dataset import SCHEMA
    from serving.app import create_app

    settings = (site / "reference/settings/index.html").read_text()
    assert all(f"HNDSR_{field.upper()}" in settings for field in EngineSettings.model_fields if field != "model_uri")
    assert "split_seed" in (site / "reference/params/index.html").read_text()
    api = (site / "reference/http-api/index.html").read_text()
    assert all(path in api for path in create_app().openapi()["paths"])
    parquet = (site / "reference/parquet/index.html").read_text()
    assert all(field.name in parquet for field in SCHEMA)
    assert "hndsr_requests_total" in (site / "reference/metrics/index.html").read_text()
    assert "hndsr predict" in (site / "reference/cli/index.html").read_text()


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    for name in ("params.yaml", "imagery", "deploy"):  # what the reference pages read
        (copy / name).symlink_to(REPO / name)
    page = copy / "docs" / "how-to" / "quotas.md"
    original = page.read_text()
    for broken, named in (("[the settings](../reference/no-such-page.md)", "no-such-page.md"),
                          ("[the settings](../reference/settings.md#no-such-anchor)", "no-such-anchor")):
        page.write_text(original + f"\nSee {broken}.\n")
        done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                              cwd=copy, capture_output=True, text=True, env=env(), timeout=600)
        assert done.returncode != 0 and named in done.stdout + done.stderr, done.stdout + done.stderr


def test_every_shell_block_is_run_or_says_why_not():
    problems = []
    for page, line, _, _, comment in shell_blocks():
        where = f"{page.relative_to(REPO)}:{line}"
        match = MARKER.fullmatch(comment.strip()) if comment else None
        if match is None:
            problems.append(f"{where}: no <!-- runs -->, <!-- run by tests/...::test_... --> or <!-- not run: ... -->")
            continue
        if match.group(2):
            test_file = REPO / match.group(2)
            if not test_file.is_file() or f"def {match.group(3)}(" not in test_file.read_text():
                problems.append(f"{where}: {match.group(2)}::{match.group(3)} is not a test")
    assert problems == []
    assert len([b for b in shell_blocks() if MARKER.fullmatch(b[4].strip()).group(1) == "runs"]) >= 2


def test_the_blocks_marked_runs_run(tmp_path):
    """Each in a folder of its own holding the repository's imagery and a small model at `models` (random
    weights: what is checked is that the commands, paths and options work as written)."""
    from tests.serving.test_server import write_model

    runs = [b for b in shell_blocks() if MARKER.fullmatch(b[4].strip()).group(1) == "runs"]
    for index, (page, line, _, body, _) in enumerate(runs):
        folder = tmp_path / f"block{index}"
        folder.mkdir()
        (folder / "imagery").symlink_to(REPO / "imagery")
        write_model(folder / "models", seed=0)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=folder, capture_output=True, text=True,
                              env={**env(), "HNDSR_DEVICE": "cpu"}, timeout=300)
        assert done.returncode == 0, f"{page.relative_to(REPO)}:{line}\n{body}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        if "hndsr keys new" in body:
            clients = yaml.safe_load((folder / "clients.yaml").read_text())["clients"]
            assert set(clients) == {"mapping-team", "archive-batch"}
        if "hndsr predict" in body:
            assert list((folder / "sr").glob("*.tif")), done.stdout


README_LIMIT = 150


def test_the_readme_is_short_and_its_links_lead_into_the_site():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LIMIT
    assert "**Status.**" not in readme
    targets = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(targets) >= 10
    assert [t for t in targets if not (REPO / t).is_file()] == []
