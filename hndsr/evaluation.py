"""Scoring a model on stored HR/LR pairs: the figures the evaluate stage reports and the promotion gate
compares (PSNR, SSIM, MS-SSIM, GMSD, detail ratio and HF share per scale, with the prior alone and bicubic as
baselines; hndsr.metrics says what each means), and the consistency of each output with its own LR
(hndsr.consistency), which needs no HR."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from hndsr.consistency import Consistency
from hndsr.metrics import detail_ratio, gmsd, hf_share, ms_ssim, psnr, ssim
from hndsr.model import DIHEDRAL, bicubic_upsample
from hndsr.splits import PairSet

log = logging.getLogger("hndsr.evaluate")


def _scores(output: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"psnr": psnr(output, hr), "ssim": ssim(output, hr), "ms_ssim": ms_ssim(output, hr),
            "gmsd": gmsd(output, hr), "detail_ratio": detail_ratio(output, hr), "hf_share": hf_share(output)}


def consistency_figures(consistency: Consistency) -> dict[str, float]:
    """The per-scale figures of hndsr.consistency that eval.json carries and the gate bounds: the shrunk-back
    output's normalised RMSE against the LR (mean over bands), spectral angle (degrees) and shift (LR px, the
    length of the pixel-weighted mean displacement over tiles)."""
    summary = consistency.summary()
    shift = summary["shift_px"]
    return {"consistency_nrmse": round(summary["reflectance_nrmse"], 5),
            "spectral_angle_deg": round(summary["spectral_angle_deg"] or 0.0, 4),
            "shift_px": round(float(np.hypot(shift["dy"], shift["dx"])), 4)}


def score(model, test: dict[float, PairSet], *, steps: int, seed: int, batch_size: int, device,
          baselines: bool = True, ensemble: bool = False, timings: dict[str, float] | None = None,
          diffusion_steps: int | None = None) -> dict:
    """Mean PSNR / SSIM / MS-SSIM / GMSD / detail ratio / HF share of `model` on `test` ({scale: pairs}) per
    scale, as {"<scale>": {"psnr", "ssim", "ms_ssim", "gmsd", "detail_ratio", "hf_share", "hr_hf_share" (the HR's
    own), "tiles", and with `baselines` the prior_* and bicubic_*}};
    with `ensemble` also ensemble_* (the geometric self-ensemble over hndsr.model.DIHEDRAL); with
    `diffusion_steps` also diffusion_* (the model sampled with that many DDIM steps: what the diffusion stage
    would buy where the default is steps = 0).
    The batch starting at tile i samples with seed `seed + i`; noise is drawn on the CPU, so the figures do
    not depend on the device. `timings`, when given, gains the seconds spent in HNDSR ("plain") and in the
    self-ensemble ("ensemble")."""
    timings = {} if timings is None else timings
    timings.setdefault("plain", 0.0)
    if ensemble:
        timings.setdefault("ensemble", 0.0)
    results = {}
    for scale, pairs in test.items():
        sums: dict[str, list[torch.Tensor]] = {}
        consistency = Consistency(model.data, None, model.data.channels)  # in model units: tiles of any type
        for i in range(0, len(pairs.tile_ids), batch_size):
            lr = pairs.lr[i : i + batch_size].to(device)
            hr = pairs.hr[i : i + batch_size].to(device)
            size = hr.shape[-2:]
            started = time.perf_counter()
            outputs = {"": model.super_resolve(lr, scale, steps=steps, seed=seed + i, size=size)}
            timings["plain"] += time.perf_counter() - started
            if ensemble:
                started = time.perf_counter()
                outputs["ensemble_"] = model.super_resolve(lr, scale, steps=steps, seed=seed + i, size=size,
                                                           ensemble=DIHEDRAL)
                timings["ensemble"] += time.perf_counter() - started
            if diffusion_steps:
                outputs["diffusion_"] = model.super_resolve(lr, scale, steps=diffusion_steps, seed=seed + i,
                                                            size=size)
            if baselines:
                outputs["prior_"] = model.super_resolve(lr, scale, steps=0, size=size)
                outputs["bicubic_"] = bicubic_upsample(lr, size)
            for prefix, output in outputs.items():
                for name, values in _scores(output.float(), hr).items():
                    sums.setdefault(prefix + name, []).append(values.cpu())
            sums.setdefault("hr_hf_share", []).append(hf_share(hr.float()).cpu())
            stored_lr = pairs.lr[i : i + batch_size].numpy()  # model units
            for tile, lr_tile in zip(outputs[""].float().permute(0, 2, 3, 1).cpu().numpy(), stored_lr, strict=True):
                consistency.add(tile, lr_tile, np.ones(lr_tile.shape[1:], dtype=bool), scale)
        results[f"{scale:g}"] = {k: round(torch.cat(v).mean().item(), 4) for k, v in sorted(sums.items())}
        results[f"{scale:g}"].update(consistency_figures(consistency))
        results[f"{scale:g}"]["tiles"] = len(pairs.tile_ids)
        log.info("scale %g: %s", scale, results[f"{scale:g}"])
    return results
