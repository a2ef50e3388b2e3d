"""`hndsr etl`: the ETL stage's entry point (the work is in pipeline.etl, imported when the command runs)."""

from __future__ import annotations

import argparse

from hndsr import tasks
from hndsr.cli import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file with an `etl` section "
                        "(default: %(default)s)")
    parser.add_argument("--out", default="data/processed", help="output folder, replaced atomically "
                        "(default: %(default)s)")
    tasks.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_params
    from pipeline.etl import run_etl, warn_if_untracked

    params = load_params(args.params)
    cluster = tasks.load_cluster(args.params, workers=args.workers, address=args.cluster)
    for source in params.sources:
        warn_if_untracked(source)
    report = run_etl(params, args.out, cluster)
    print(report.summary(), flush=True)
    return 0


etl = Command("cut source imagery into HR/LR tiles and write the Parquet splits + manifest", add_arguments, run)
