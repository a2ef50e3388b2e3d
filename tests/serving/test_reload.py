"""The hot reload's view of a registry it cannot read: a SQLite tracking database locked by another process is
no failed reload (no alert), one warning line while it lasts and one when it ends, never a traceback."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from inference import loader
from serving import runtime
from serving.settings import Settings
from serving.state import State

pytestmark = pytest.mark.slow


def test_a_locked_tracking_database_is_one_line_and_no_failed_reload(tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    database = tmp_path / "mlflow.db"
    uri = f"sqlite:///{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    MlflowClient(uri).create_registered_model("served")
    loader.quiet_store_errors()
    state = State(Settings(model_uri="models:/served@production", poll_s=1))
    assert asyncio.run(runtime.read_alias(state, state.settings.model_uri)) is None and not state.registry_down

    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing for longer than MLflow's 20 s busy timeout
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            assert asyncio.run(runtime.read_alias(state, state.settings.model_uri)) is None
            assert state.registry_down
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert asyncio.run(runtime.read_alias(state, state.settings.model_uri)) is None and not state.registry_down
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("hndsr", "mlflow"))]
    assert [r.levelname for r in lines] == ["WARNING", "INFO"], [r.getMessage() for r in lines]
    assert "database is locked" in lines[0].getMessage() and "\n" not in lines[0].getMessage()
    assert lines[1].getMessage() == "the registry answers again"
    assert not any(r.exc_info for r in caplog.records)
    metrics = state.metrics.render()[0].decode()
    assert "hndsr_registry_errors_total 1.0" in metrics and 'outcome="failed"' not in metrics
