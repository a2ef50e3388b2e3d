"""The training stages' error, in a module of its own so that every training module can raise it without
importing the modules that run studies (`distributed` and `trainers` are imported by `study`, never the reverse)."""

from __future__ import annotations

from hndsr.errors import UserError


class TrainingError(UserError, RuntimeError):
    """A training stage could not produce a model; the message says why."""
