"""The `hndsr` command: one subcommand per pipeline step.

The package that owns a step provides its subcommand as a `Command` and names it in the `hndsr.commands`
entry-point group of pyproject.toml (`etl = "pipeline.cli:etl"`), so this module, the model's ground floor,
imports none of them. Command modules are thin (argparse only) and import the step's code when it runs, so
`hndsr --help` is fast and the serving image (which has no training stack) can run `hndsr serve`.

Errors a user can fix (`hndsr.errors.UserError` and its subclasses, MLflow's errors) are printed as one line
with the error's exit status (1, or 2 for bad params); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from hndsr.errors import UserError

GROUP = "hndsr.commands"
# Third-party errors that mean "fix your set-up" (e.g. a tracking server refusing a request): one line, status 1.
_LIBRARY_USER_ERRORS = frozenset({"mlflow.exceptions.MlflowException"})


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its arguments, and what it runs (returns the exit status)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def commands() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed subcommands by name (not yet imported)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def _describe(entry_points: dict[str, importlib.metadata.EntryPoint]) -> str:
    lines = []
    for name, ep in sorted(entry_points.items()):
        try:
            help_ = ep.load().help
        except Exception as exc:  # a command whose package is not installed here (e.g. in the serving image)
            help_ = f"(unavailable here: {type(exc).__name__}: {exc})"
        lines.append(f"  {name:<10} {help_}")
    return "\n".join(lines)


def _parser(names: list[str], described: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hndsr",
        description="HNDSR satellite-image super-resolution: data, training, registry and serving.",
        epilog=f"commands:\n{described}\n\nRun `hndsr COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hndsr {importlib.metadata.version('hndsr')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("command", choices=names, metavar="COMMAND", help="the step to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError) or any(f"{cls.__module__}.{cls.__qualname__}" in _LIBRARY_USER_ERRORS
                                             for cls in type(exc).__mro__)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = commands()
    first = next((a for a in argv if not a.startswith("-")), None)
    # Only top-level help (or a wrong command) needs every command's help line, which imports every command module.
    described = _describe(available) if first not in available else ""
    top = _parser(sorted(available), described).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if top.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    command: Command = available[top.command].load()
    parser = argparse.ArgumentParser(prog=f"hndsr {top.command}", description=command.help)
    command.add_arguments(parser)
    args = parser.parse_args(top.args)
    try:
        return int(command.run(args) or 0)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"hndsr {top.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    finally:
        from hndsr import params

        params.write_trace(["hndsr", top.command, *top.args])


if __name__ == "__main__":
    sys.exit(main())
