"""`hndsr train STAGE`: the training stages' entry point (the work is in training.stages, imported when the
command runs, so `hndsr --help` stays fast)."""

from __future__ import annotations

import argparse

from hndsr.cli import Command
from training.config import STAGE_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGE_NAMES, help="which network to train (upstream ones must exist)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from training.stages import run_stage

    run_stage(args.stage, args.params)
    return 0


train = Command("train one stage (autoencoder, operator, diffusion) with an Optuna sweep", add_arguments, run)
