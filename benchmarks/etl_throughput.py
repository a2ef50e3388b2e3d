"""ETL throughput on the default source (Blue Marble): tiles per second, over repeated full runs.

    python benchmarks/etl_throughput.py [--params params.yaml] [--source SOURCE] [--repeat 3]

Prints one line per run and a median. "cut" counts every grid tile examined, "kept" the tiles written (each
with one row per scale). Nothing here is a test: it only measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time

import torch

from pipeline.config import load_params
from pipeline.etl import run_etl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--source", help="override etl.source (default: the params file's)")
    parser.add_argument("--repeat", type=int, default=3, help="full runs to time (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_params(args.params)
    if args.source:
        params = dataclasses.replace(params, source=args.source)
    print(f"source={params.source} tile_size={params.tile_size} scales={params.scales} "
          f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()}")
    seconds, kept_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            start = time.perf_counter()
            report = run_etl(params, f"{tmp}/run{i}")
            elapsed = time.perf_counter() - start
            inputs = report.manifest["inputs"]
            rows = sum(s["rows"] for s in report.manifest["splits"].values())
            seconds.append(elapsed)
            kept_rates.append(inputs["tiles_kept"] / elapsed)
            print(f"run {i + 1}: {elapsed:6.2f} s  cut {inputs['tiles_cut'] / elapsed:7.1f} tiles/s  "
                  f"kept {inputs['tiles_kept'] / elapsed:7.1f} tiles/s  rows {rows / elapsed:7.1f} rows/s")
    print(f"median: {statistics.median(seconds):.2f} s, {statistics.median(kept_rates):.1f} kept tiles/s "
          f"({inputs['tiles_kept']} kept of {inputs['tiles_cut']} cut, {rows} rows)")


if __name__ == "__main__":
    main()
