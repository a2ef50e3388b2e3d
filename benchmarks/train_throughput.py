"""Training throughput per stage, in samples (HR crops) per second, with the params.yaml settings.

    python benchmarks/train_throughput.py [--params params.yaml] [--iterations 40]

Runs each stage's real trainer (`training.trainers`) for `--iterations` steps on Blue Marble crops from
data/processed (run the etl stage first) and prints the `samples_per_s` the training loop measures over its
optimisation steps (evaluation excluded). Upstream networks are freshly initialised, which costs the same
time as trained ones, so no checkpoint is needed. Device: CUDA when present (bf16 autocast), else CPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from hndsr.networks import Autoencoder, AutoencoderConfig, NeuralOperator, OperatorConfig
from hndsr.params import load_common
from hndsr.splits import load_hr_tiles, load_pairs
from training.config import load_stage
from training.trainers import TRAINERS, Context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    common = load_common(args.params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ae_params, _ = load_stage(args.params, "autoencoder")
    op_params, _ = load_stage(args.params, "operator")
    ae = Autoencoder(AutoencoderConfig(**ae_params.model))
    ctx = Context(train_tiles=load_hr_tiles(common.data_dir, "train"),
                  val=load_pairs(common.data_dir, "val", limit=4), scale_range=tuple(common.scale_range),
                  device=device, amp=device.type == "cuda", autoencoder=ae,
                  operator=NeuralOperator(OperatorConfig(latent_channels=ae.config.latent_channels,
                                                         **op_params.model)))
    print(f"device={device.type} amp={'bf16' if ctx.amp else 'off'} threads={torch.get_num_threads()} "
          f"iterations={args.iterations}")
    for stage, trainer in TRAINERS.items():
        params, extras = load_stage(args.params, stage)
        params = dataclasses.replace(params, iterations=args.iterations, eval_every=args.iterations)
        ctx.extras = extras
        result = trainer(params, {}, ctx, lambda step, metrics: None, 0)
        rate = result.history[-1]["samples_per_s"]
        print(f"{stage:12s} {rate:8.1f} samples/s  ({params.batch_size} x {params.crop} px crops, "
              f"{params.batch_size / rate * 1000:.0f} ms/step)")


if __name__ == "__main__":
    main()
