"""The base of every error a user can fix by changing input, params or set-up.

`hndsr` (the command) prints such an error as one line, `hndsr COMMAND: error: <message>`, and exits with the
class's `exit_code` instead of a traceback. Each package derives its own errors from `UserError`, so the command
line needs no list of them.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message says what to fix; exit status `exit_code` (1 unless a subclass says otherwise)."""

    exit_code = 1
