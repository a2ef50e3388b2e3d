"""The three stage trainers: autoencoder, neural operator, diffusion UNet.

Each trains one network for one set of hyperparameters (one Optuna trial), calling `report(step, metrics)`
after every evaluation (Optuna prunes through it), and returns the trained network with its validation
score. Upstream networks come frozen in the `Context`.

Objectives (maximised): autoencoder, validation reconstruction PSNR; operator, validation PSNR of the decoded
prior averaged over the dataset's scales; diffusion, validation PSNR of the full model with the probe
sampling settings, averaged over scales.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hndsr.metrics import detail_ratio, gmsd, ms_ssim, psnr
from hndsr.model import HNDSR, SamplingDefaults, bicubic_upsample, latent_prior
from hndsr.networks import (
    Autoencoder,
    AutoencoderConfig,
    DiffusionUNet,
    NeuralOperator,
    OperatorConfig,
    UNetConfig,
)
from hndsr.scheduler import DDIMConfig, DDIMScheduler
from hndsr.splits import PairSet, TileSet
from training import distributed
from training.config import DiffusionExtras, StageParams
from training.data import CropSampler
from training.ema import EMA

log = logging.getLogger("hndsr.train")

Report = Callable[[int, dict[str, float] | None], None]  # None: a torchrun rank other than 0 (rank 0 evaluates)
PROBE = SamplingDefaults(steps=4, eta=0.0, temperature=0.5)  # cheap sampling used to score diffusion trials
LATENT_WEIGHT = 0.1  # operator loss: pixel L1 + this x latent L1 to the encoded HR


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """x minus its 3x3 local mean (reflect padding): the detail a smooth output lacks. (B, C, H, W) -> same."""
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)


def pixel_loss(output: torch.Tensor, hr: torch.Tensor, hf_weight: float) -> torch.Tensor:
    """L1, plus `hf_weight` x the L1 of the high-pass of both: L1 alone lets a slightly blurred output off
    cheaply, since edges are a small share of the pixels."""
    loss = F.l1_loss(output, hr)
    return loss + hf_weight * F.l1_loss(high_pass(output), high_pass(hr)) if hf_weight else loss


@dataclass
class Context:
    """What every trial of a stage shares: data, device and the frozen upstream networks."""

    train_tiles: TileSet  # model values and the levels of their stored types
    val: dict[float, PairSet]
    scale_range: tuple[float, float]
    device: torch.device
    amp: bool
    autoencoder: Autoencoder | None = None
    operator: NeuralOperator | None = None
    extras: DiffusionExtras | None = None


@dataclass
class TrialResult:
    network: nn.Module
    score: float
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def model_config(config_cls, params: StageParams, hp: dict, **fixed):
    """The network config: params' `model` section, overridden by `model.<field>` hyperparameters."""
    args = {**params.model, **{k[len("model."):]: v for k, v in hp.items() if k.startswith("model.")}, **fixed}
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ValueError(f"unknown model argument {unknown[0]!r} for {config_cls.__name__} (known: {sorted(names)})")
    return config_cls(**args)


def _autocast(ctx: Context):
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp)


def _frozen(network: nn.Module | None, device: torch.device) -> nn.Module:
    if network is None:
        raise ValueError("an upstream network is missing from the context")
    network = network.to(device).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def _loop(name: str, params: StageParams, hp: dict, network: nn.Module, ctx: Context, sampler: CropSampler,
          loss_fn: Callable[[], torch.Tensor], evaluate: Callable[[], dict[str, float]], report: Report):
    """Shared optimisation loop: Adam with cosine decay, periodic evaluation and reporting. With `ema` in the
    params, evaluations score the moving average of the weights and the network ends holding it. Under torchrun
    `loss_fn` runs the DistributedDataParallel module (`distributed.wrap`), so backward averages the gradients
    over the ranks; `samples_per_s` counts the global batch.

    Each evaluation also reports the training throughput since the previous one (`samples_per_s`,
    optimisation steps only, evaluation excluded)."""
    optimizer = torch.optim.Adam(network.parameters(), lr=hp.get("lr", params.lr))
    ema = EMA(network, params.ema) if params.ema else None
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.iterations)
    history, running, train_seconds = [], [], 0.0
    bar = tqdm(range(1, params.iterations + 1), desc=name, unit="it", leave=False, disable=None)
    for step in bar:
        started = time.perf_counter()
        network.train()
        with _autocast(ctx):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(network)
        running.append(loss.item())  # .item() synchronises, so the timing covers the GPU work too
        train_seconds += time.perf_counter() - started
        if step % params.eval_every == 0 or step == params.iterations:
            if not distributed.world().main:  # rank 0 evaluates and decides; this rank waits for the decision
                running, train_seconds = [], 0.0
                report(step, None)
                continue
            network.eval()
            with torch.no_grad(), ema.applied(network) if ema is not None else contextlib.nullcontext():
                metrics = {"train_loss": sum(running) / len(running),
                           "samples_per_s": len(running) * params.batch_size / train_seconds, **evaluate()}
            running, train_seconds = [], 0.0
            history.append({"step": step, **metrics})
            bar.set_postfix(val=f"{metrics['val_score']:.3f}")
            if bar.disable:  # no terminal (dvc repro, CI, a log file): one line per evaluation instead of the bar
                log.info("%s: step %d/%d, train loss %.3g, validation %.4f, %.0f samples/s", name, step,
                         params.iterations, metrics["train_loss"], metrics["val_score"], metrics["samples_per_s"])
            report(step, metrics)
    if ema is not None:  # the averaged weights are what the last evaluation scored and what the stage saves
        ema.copy_to(network)
    return history


def train_autoencoder(params: StageParams, hp: dict, ctx: Context, report: Report, seed: int) -> TrialResult:
    config = model_config(AutoencoderConfig, params, hp, channels=ctx.train_tiles.pixels.shape[1])
    network = Autoencoder(config)
    every = max(1, len(ctx.train_tiles) // 256)  # up to 256 tiles spread over the split, not its first rows
    network.fit_linear(ctx.train_tiles.pixels[::every].contiguous())
    network = network.to(ctx.device)
    trained = distributed.wrap(network)
    sampler = CropSampler(ctx.train_tiles, crop=params.crop, batch_size=params.batch_size,
                          scale_range=ctx.scale_range, seed=seed,
                          part=distributed.shard(params.batch_size))
    val_hr = next(iter(ctx.val.values())).hr.to(ctx.device)

    def loss_fn():
        hr = sampler.hr_batch().to(ctx.device)
        return F.mse_loss(trained(hr).float(), hr)

    def evaluate():
        value = psnr(network(val_hr).float().clamp(0, 1), val_hr).mean().item()
        return {"val_score": value, "val_recon_psnr": value}

    history = _loop("autoencoder", params, hp, network, ctx, sampler, loss_fn, evaluate, report)
    if not history:  # a torchrun rank other than 0: it trained its share; rank 0 scores and keeps the result
        return TrialResult(network.cpu().eval(), float("nan"), {})
    final = history[-1]
    return TrialResult(network.cpu().eval(), final["val_score"], {"val_recon_psnr": final["val_recon_psnr"]},
                       history)


def evaluate_by_scale(ctx: Context, fn: Callable[[torch.Tensor, float, tuple], torch.Tensor],
                      prefix: str) -> dict[str, float]:
    """PSNR of `fn(lr, scale, size)` on every validation scale, plus their mean as `val_score`."""
    metrics, scores = {}, []
    for scale, pairs in ctx.val.items():
        lr, hr = pairs.lr.to(ctx.device), pairs.hr.to(ctx.device)
        value = psnr(fn(lr, scale, hr.shape[-2:]).float().clamp(0, 1), hr).mean().item()
        metrics[f"{prefix}_x{scale:g}"] = value
        scores.append(value)
    metrics["val_score"] = sum(scores) / len(scores)
    return metrics


def train_operator(params: StageParams, hp: dict, ctx: Context, report: Report, seed: int) -> TrialResult:
    ae = _frozen(ctx.autoencoder, ctx.device)
    config = model_config(OperatorConfig, params, hp, latent_channels=ae.config.latent_channels,
                          channels=ae.config.channels)
    network = NeuralOperator(config).to(ctx.device)
    trained = distributed.wrap(network)
    sampler = CropSampler(ctx.train_tiles, crop=params.crop, batch_size=params.batch_size,
                          scale_range=ctx.scale_range, seed=seed,
                          part=distributed.shard(params.batch_size))

    def loss_fn():
        lr, hr, scale = sampler.batch()
        lr, hr = lr.to(ctx.device), hr.to(ctx.device)
        prior = latent_prior(ae, trained, lr, scale, hr.shape[-2:])
        with torch.no_grad():
            target = ae.encode(hr)
        return (pixel_loss(ae.decode(prior).float(), hr, params.hf_weight)
                + LATENT_WEIGHT * F.l1_loss(prior.float(), target.float()))

    def evaluate():
        return evaluate_by_scale(ctx, lambda lr, s, size: ae.decode(latent_prior(ae, network, lr, s, size)), "val_psnr")

    history = _loop("operator", params, hp, network, ctx, sampler, loss_fn, evaluate, report)
    if not history:
        return TrialResult(network.cpu().eval(), float("nan"), {})
    final = {k: v for k, v in history[-1].items() if k.startswith("val_psnr")}
    return TrialResult(network.cpu().eval(), history[-1]["val_score"], final, history)


def train_diffusion(params: StageParams, hp: dict, ctx: Context, report: Report, seed: int) -> TrialResult:
    ae, op = _frozen(ctx.autoencoder, ctx.device), _frozen(ctx.operator, ctx.device)
    extras = ctx.extras or DiffusionExtras()
    scheduler = DDIMScheduler(DDIMConfig(extras.num_train_timesteps, extras.prediction_type))
    config = model_config(UNetConfig, params, hp, latent_channels=ae.config.latent_channels)
    network = DiffusionUNet(config).to(ctx.device)
    trained = distributed.wrap(network)
    start, stop = distributed.shard(params.batch_size)
    sampler = CropSampler(ctx.train_tiles, crop=params.crop, batch_size=params.batch_size,
                          scale_range=ctx.scale_range, seed=seed,
                          part=distributed.shard(params.batch_size))
    generator = torch.Generator().manual_seed(seed)
    model = HNDSR(ae, op, network, scheduler, min_scale=ctx.scale_range[0], max_scale=ctx.scale_range[1],
                  defaults=PROBE)

    def loss_fn():
        lr, hr, scale = sampler.batch()
        lr, hr = lr.to(ctx.device), hr.to(ctx.device)
        with torch.no_grad():
            prior = latent_prior(ae, op, lr, scale, hr.shape[-2:])
            residual = ae.encode(hr) - prior  # (B, latent, H/2, W/2): what the prior is missing
        # drawn for the global batch, so every rank's generator stays in step; this rank keeps its rows
        timesteps = torch.randint(0, extras.num_train_timesteps, (params.batch_size,), generator=generator)
        noise = torch.randn((params.batch_size, *residual.shape[1:]), generator=generator)
        timesteps, noise = timesteps[start:stop], noise[start:stop].to(ctx.device)
        noisy = scheduler.add_noise(residual, noise, timesteps.to(ctx.device))
        target = residual if extras.prediction_type == "sample" else noise
        scales = torch.full((hr.shape[0],), scale, device=ctx.device)
        return F.mse_loss(trained(noisy, timesteps.to(ctx.device), prior, scales).float(), target)

    def evaluate():
        return evaluate_by_scale(ctx, lambda lr, s, size: model.super_resolve(lr, s, size=size, seed=0), "val_psnr")

    history = _loop("diffusion", params, hp, network, ctx, sampler, loss_fn, evaluate, report)
    if not history:
        return TrialResult(network.cpu().eval(), float("nan"), {})
    final = {k: v for k, v in history[-1].items() if k.startswith("val_psnr")}
    return TrialResult(network.cpu().eval(), history[-1]["val_score"], final, history)


@torch.no_grad()
def choose_sampling(model: HNDSR, ctx: Context, extras: DiffusionExtras) -> tuple[SamplingDefaults, list[dict]]:
    """Pick the default sampling on validation by the declared trade-off (`pick`): steps = 0 (the prior alone)
    and every (steps, temperature, strength) of the choices are scored at every validation scale: PSNR cost
    against steps = 0, gain over bicubic, GMSD and MS-SSIM (hndsr.metrics) and the detail ratio.

    Returns the choice and the table of every candidate, the chosen one marked (for the checkpoint, the stage's
    metrics and MLflow).
    """
    model = model.to(ctx.device).eval()
    val = []  # per scale: (scale, hr, prior latent, steps-0 PSNR, bicubic PSNR)
    prior_acc = _candidate_acc()
    for scale, pairs in ctx.val.items():
        lr, hr = pairs.lr.to(ctx.device), pairs.hr.to(ctx.device)
        size = hr.shape[-2:]
        prior = model.prior(lr, scale, size)
        decoded = model.autoencoder.decode(prior)[..., : size[0], : size[1]].clamp(0, 1)
        base, bicubic = psnr(decoded, hr).mean().item(), psnr(bicubic_upsample(lr, size), hr).mean().item()
        _score_candidate(prior_acc, decoded, hr, base, bicubic)
        val.append((scale, hr, prior, base, bicubic))
    table = [_candidate_row(prior_acc, extras, steps=0, temperature=None, strength=None)]
    for steps in extras.steps_choices:
        for temperature in extras.temperature_choices:
            rows = {s: _candidate_acc() for s in extras.strength_choices}
            for scale, hr, prior, base, bicubic in val:
                residual = model.sample_residual(prior, scale, steps=steps, eta=extras.eta,
                                                 temperature=temperature, seed=0)
                for strength, acc in rows.items():
                    out = model.autoencoder.decode(prior + strength * residual)
                    _score_candidate(acc, out[..., : hr.shape[-2], : hr.shape[-1]].clamp(0, 1), hr, base, bicubic)
            for strength, acc in rows.items():
                table.append(_candidate_row(acc, extras, steps=steps, temperature=temperature, strength=strength))
    for row in table:
        log.info("sampling candidate %s", row)
    chosen = pick(table, extras)
    chosen["chosen"] = True
    # With steps = 0 chosen, temperature and strength are still recorded (those of the best setting with steps),
    # so a request that asks for steps gets the validated way of taking them.
    sampler = chosen if chosen["steps"] else min((r for r in table if r["steps"]), key=lambda r: r["gmsd"])
    return SamplingDefaults(steps=chosen["steps"], eta=extras.eta, temperature=sampler["temperature"],
                            strength=sampler["strength"]), table


def pick(table: list[dict], extras: DiffusionExtras) -> dict:
    """The declared trade-off. Eligible: at every validation scale at most `max_psnr_cost` dB PSNR below steps = 0
    and at least `min_gain_over_bicubic` dB above bicubic. Among the eligible, the lowest GMSD (edges: the
    perceptual figure); a setting with steps is taken over steps = 0 only if it lowers GMSD by at least
    `min_gmsd_gain` (relative), else the diffusion stage buys nothing measurable and the default is steps = 0.
    With nothing eligible, the cheapest in PSNR (the stage's metrics show the shortfall)."""
    prior = next(r for r in table if r["steps"] == 0)
    eligible = [r for r in table if r["eligible"]]
    if not eligible:
        log.warning("no sampling setting costs <= %.2f dB and keeps %.2f dB over bicubic at every scale; "
                    "taking the cheapest one", extras.max_psnr_cost, extras.min_gain_over_bicubic)
        return min(table, key=lambda r: (r["max_psnr_cost"], r["steps"]))
    best = min(eligible, key=lambda r: (r["gmsd"], r["steps"]))
    if best["steps"] and prior["eligible"] and best["gmsd"] > prior["gmsd"] * (1 - extras.min_gmsd_gain):
        log.info("sampling: the best setting with steps (%s) lowers validation GMSD by %.1f %% only (< %.1f %%): "
                 "default steps = 0", {k: best[k] for k in ("steps", "temperature", "strength")},
                 100 * (1 - best["gmsd"] / prior["gmsd"]), 100 * extras.min_gmsd_gain)
        return prior
    return best


def _candidate_acc() -> dict:
    return {"cost": 0.0, "gain": float("inf"), "detail": [], "gmsd": [], "ms_ssim": []}


def _score_candidate(acc: dict, out: torch.Tensor, hr: torch.Tensor, base: float, bicubic: float) -> None:
    """One validation scale's figures of one candidate's output, into its accumulator."""
    value = psnr(out, hr).mean().item()
    acc["cost"], acc["gain"] = max(acc["cost"], base - value), min(acc["gain"], value - bicubic)
    acc["detail"].append(detail_ratio(out, hr).mean().item())
    acc["gmsd"].append(gmsd(out, hr).mean().item())
    acc["ms_ssim"].append(ms_ssim(out, hr).mean().item())


def _candidate_row(acc: dict, extras: DiffusionExtras, **setting) -> dict:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    row = {**setting, "max_psnr_cost": acc["cost"], "min_gain_over_bicubic": acc["gain"],
           "detail_ratio": mean(acc["detail"]), "gmsd": mean(acc["gmsd"]), "ms_ssim": mean(acc["ms_ssim"])}
    row["eligible"] = (row["max_psnr_cost"] <= extras.max_psnr_cost
                       and row["min_gain_over_bicubic"] >= extras.min_gain_over_bicubic)
    return row


TRAINERS = {"autoencoder": train_autoencoder, "operator": train_operator, "diffusion": train_diffusion}
