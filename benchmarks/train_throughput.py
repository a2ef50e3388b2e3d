"""Training throughput per stage, in samples (HR crops) per second, with the params.yaml settings.

    python benchmarks/train_throughput.py [--params params.yaml] [--iterations 30] [--device auto]

Times `--iterations` optimisation steps of each trainer after 3 warm-up steps, on random Blue Marble
crops from data/processed (run the etl stage first). Needs no trained checkpoints: upstream networks are
freshly initialised, which costs the same time as trained ones.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hndsr.model import bicubic_upsample
from hndsr.networks import (
    Autoencoder,
    AutoencoderConfig,
    DiffusionUNet,
    NeuralOperator,
    OperatorConfig,
    UNetConfig,
)
from hndsr.scheduler import DDIMScheduler
from training.config import load_common, load_stage
from training.data import CropSampler, load_hr_tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    amp = device.type == "cuda"
    common = load_common(args.params)
    tiles = load_hr_tiles(common.data_dir, "train")
    ae_p, _ = load_stage(args.params, "autoencoder")
    op_p, _ = load_stage(args.params, "operator")
    df_p, _ = load_stage(args.params, "diffusion")
    ae = Autoencoder(AutoencoderConfig(**ae_p.model)).to(device)
    op = NeuralOperator(OperatorConfig(latent_channels=ae.config.latent_channels, **op_p.model)).to(device)
    unet = DiffusionUNet(UNetConfig(latent_channels=ae.config.latent_channels, **df_p.model)).to(device)
    scheduler = DDIMScheduler()
    print(f"device={device.type} amp={'bf16' if amp else 'off'} threads={torch.get_num_threads()} "
          f"iterations={args.iterations}")

    def ae_step(sampler):
        hr = sampler.hr_batch().to(device)
        return F.mse_loss(ae(hr).float(), hr)

    def op_step(sampler):
        lr, hr, scale = sampler.batch()
        lr, hr = lr.to(device), hr.to(device)
        up = bicubic_upsample(lr, hr.shape[-2:])
        prior = ae.encode(up).detach() + op(up, torch.full((hr.shape[0],), scale, device=device))
        return F.l1_loss(ae.decode(prior).float(), hr)

    def unet_step(sampler):
        lr, hr, scale = sampler.batch()
        lr, hr = lr.to(device), hr.to(device)
        with torch.no_grad():
            up = bicubic_upsample(lr, hr.shape[-2:])
            prior = ae.encode(up) + op(up, torch.full((hr.shape[0],), scale, device=device))
            residual = ae.encode(hr) - prior
        t = torch.randint(0, 1000, (hr.shape[0],), device=device)
        noisy = scheduler.add_noise(residual, torch.randn_like(residual), t)
        return F.mse_loss(unet(noisy, t, prior, torch.full((hr.shape[0],), scale, device=device)).float(), residual)

    for name, params, network, step in (("autoencoder", ae_p, ae, ae_step), ("operator", op_p, op, op_step),
                                        ("diffusion", df_p, unet, unet_step)):
        sampler = CropSampler(tiles, crop=params.crop, batch_size=params.batch_size,
                              scale_range=tuple(common.scale_range), seed=0)
        optimizer = torch.optim.Adam(network.parameters(), lr=params.lr)
        for i in range(3 + args.iterations):
            if i == 3:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                loss = step(sampler)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        samples = args.iterations * params.batch_size
        print(f"{name:12s} {samples / elapsed:8.1f} samples/s  ({params.batch_size}x{params.crop}px crops, "
              f"{elapsed / args.iterations * 1000:.0f} ms/step)")


if __name__ == "__main__":
    main()
