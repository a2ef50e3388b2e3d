"""The serving image, built once per session for the container tests (test_image.py, test_stack.py)."""

from __future__ import annotations

import pytest

from tests.containers import build_serve_image, require_engine


@pytest.fixture(scope="session")
def serve_image() -> str:
    require_engine()
    return build_serve_image()["tag"]
