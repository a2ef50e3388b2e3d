"""`hndsr train STAGE`: the training stages' entry point (the work is in training.stages, imported when the
command runs, so `hndsr --help` stays fast).

`hndsr train STAGE` runs the stage: it opens the stage's Optuna study (the sweep), works through it, and writes
the best trial's checkpoint. `hndsr train [STAGE] --worker`, on this or any machine sharing the study storage
(PostgreSQL) and the MLflow tracking server, joins open sweeps and runs their queued trials. With
`train.processes` > 1 (or under `torchrun`) every trial trains data-parallel on that many processes.
"""

from __future__ import annotations

import argparse
import os
import sys

from hndsr.cli import Command
from training.config import STAGE_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train one stage (autoencoder, operator, diffusion) with an Optuna sweep of train_<stage>.n_trials trials, "
        "or, with --worker, help run the sweeps a stage started (on this or another machine).")
    parser.add_argument("stage", nargs="?", choices=STAGE_NAMES,
                        help="which network to train (upstream ones must exist); optional with --worker")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--worker", action="store_true",
                        help="join open sweeps in the study storage (train.study_storage or HNDSR_STUDY_STORAGE) "
                             "and run their queued trials; the stage's own process writes the result. A worker on "
                             "the same machine as the stage shares its cores: give each process its share "
                             "(train.threads, or OMP_NUM_THREADS=cores/processes), or both run several times slower")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="with --worker: how long to wait for a sweep with queued trials before exiting "
                             "(default: %(default)s; a worker for a whole `dvc repro` waits for each next stage)")


def run(args: argparse.Namespace) -> int:
    from hndsr import cores
    from hndsr.params import load_common

    if not args.worker and args.stage is None:
        print("hndsr train: error: name the stage to train (or use --worker to join running sweeps)", file=sys.stderr)
        return 2
    processes = load_common(args.params).processes
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # run this same command under torchrun
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "hndsr.cli", "train", *([args.stage] if args.stage else []), "--params", args.params,
                   *(["--worker", "--wait", str(args.wait)] if args.worker else [])]
        # each process its share of the cores, unless the user chose (torchrun's own default is 1 thread)
        for name, value in cores.share_env(processes).items():
            os.environ.setdefault(name, value)
        print(f"hndsr train: {processes} processes (train.processes), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
              f"each: {' '.join(command[1:])}", flush=True)
        os.execv(sys.executable, command)
    if args.worker:
        from training.stages import run_worker

        run_worker(args.stage, args.params, args.wait)
        return 0
    from training.stages import run_stage

    run_stage(args.stage, args.params)
    return 0


train = Command("train one stage (autoencoder, operator, diffusion) with an Optuna sweep, or join sweeps as a "
                "worker (--worker)", add_arguments, run)
