"""The `hndsr` command: one subcommand per pipeline step.

Each subcommand lives in the package that owns the step and is imported only when it runs, so `hndsr --help`
is fast and the serving image (which has no training stack) can run `hndsr serve` without importing it.
A subcommand module provides ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "etl": ("pipeline.etl", "cut source imagery into HR/LR tiles and write the Parquet splits + manifest"),
    "train": ("training.stages", "train one stage (autoencoder, operator, diffusion) with an Optuna sweep"),
    "evaluate": ("training.evaluate", "score HNDSR, its prior and bicubic on the test split at every scale"),
    "registry": ("registry.cli", "register the model, gate and promote it (alias production), status, rollback"),
    "serve": ("serving.cli", "serve the production model over HTTP (FastAPI + uvicorn)"),
}

# Errors a user can fix: printed as one line, exit status 1 (2 for bad params or arguments).
_USER_ERRORS = {
    "hndsr.config.ConfigError": 2,
    "pipeline.sources.SourceError": 1,
    "pipeline.etl.EtlError": 1,
    "training.data.DataError": 1,
    "training.study.TrainingError": 1,
    "hndsr.checkpoint.CheckpointError": 1,
    "registry.store.RegistryError": 1,
    "mlflow.exceptions.MlflowException": 1,
}


def _parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="hndsr",
        description="HNDSR satellite-image super-resolution: data, training, registry and serving.",
        epilog=f"commands:\n{lines}\n\nRun `hndsr COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hndsr {importlib.metadata.version('hndsr')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="the step to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _exit_code_for(exc: BaseException) -> int | None:
    for cls in type(exc).__mro__:
        code = _USER_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return None


def main(argv: list[str] | None = None) -> int:
    top = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if top.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module_name, help_ = COMMANDS[top.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"hndsr {top.command}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(top.args)
    try:
        return int(module.main(args) or 0)
    except Exception as exc:
        code = _exit_code_for(exc)
        if code is None:
            raise
        print(f"hndsr {top.command}: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
