"""The lock files pin every package of every environment, agree with pyproject.toml, and are what is installed.

(`make lock-check`, run by CI, also re-resolves pyproject.toml and compares; these checks need no network.)
"""

from __future__ import annotations

import importlib.metadata
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.code_graph import REPO, pyproject

LOCKS = {"dev": REPO / "requirements" / "dev.txt", "serve": REPO / "requirements" / "serve.txt"}
ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s\\;]+)")


def locked(name: str) -> dict[str, str]:
    """{canonical name: version} of a lock file; each entry must be pinned with == and carry a hash."""
    text = LOCKS[name].read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])  # after uv's two header lines
    pins = {}
    for entry in entries:
        match = ENTRY.match(entry)
        assert match, f"{LOCKS[name].name}: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{LOCKS[name].name}: {match['name']} has no hash"
        pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def _requirements(name: str) -> list[Requirement]:
    project = pyproject()
    extras = project["project"]["optional-dependencies"]
    listed = extras["serve"] if name == "serve" else project["project"]["dependencies"] + extras["dev"]
    return [Requirement(r) for r in listed + pyproject()["build-system"]["requires"]]


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_requirement_of_pyproject_is_locked_at_an_allowed_version(name):
    pins = locked(name)
    assert "torch" not in pins, "torch is pinned in pyproject.toml and installed by TORCH_SPEC, not the lock"
    for requirement in _requirements(name):
        key = canonicalize_name(requirement.name)
        if key == "torch":
            continue
        assert key in pins, f"{requirement} is not in {LOCKS[name].name}: run `make lock`"
        assert requirement.specifier.contains(pins[key], prereleases=True), \
            f"{LOCKS[name].name} pins {key}=={pins[key]}, outside {requirement}: run `make lock`"
        for extra in requirement.extras:  # e.g. dvc[s3]: the extra's packages are locked too
            for dependency in importlib.metadata.requires(requirement.name) or []:
                inner = Requirement(dependency)
                if inner.marker and inner.marker.evaluate({"extra": extra}) and not inner.marker.evaluate({"extra": ""}):
                    assert canonicalize_name(inner.name) in pins, f"{inner.name} (from {requirement}) is not locked"


def test_serve_lock_is_the_dev_lock_where_they_overlap():
    dev, serve = locked("dev"), locked("serve")
    assert {k: v for k, v in serve.items() if k in dev and dev[k] != v} == {}


def test_torch_is_pinned_to_one_version_everywhere():
    project = pyproject()["project"]
    pins = {r for r in project["dependencies"] + project["optional-dependencies"]["serve"] if r.startswith("torch")}
    assert len(pins) == 1 and next(iter(pins)).startswith("torch=="), pins
    pin = next(iter(pins))
    assert f"TORCH_SPEC ?= {pin}" in (REPO / "Makefile").read_text()
    assert f'ARG TORCH_SPEC="{pin}"' in (REPO / "serving" / "Dockerfile").read_text()


def test_this_environment_is_the_locked_one():
    """The tests run in what `make test` installed: every locked package at its locked version."""
    different = {}
    for name, version in locked("dev").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            different[name] = (version, installed)
    assert different == {}, "installed packages differ from requirements/dev.txt (locked, installed): run `make test`"
