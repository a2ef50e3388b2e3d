"""`hndsr evaluate`: the evaluation stage's entry point (the work is in training.evaluate, imported when the
command runs)."""

from __future__ import annotations

import argparse

from hndsr.cli import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--reports", default="reports", help="folder for the sample grid (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    evaluate(args.params, args.reports)
    return 0


evaluate = Command("score HNDSR, its prior and bicubic on the test split at every scale", add_arguments, run)
