"""The promotion gate's checks. Each returns a `Check`: its name, pass/fail, one line saying why, and the
numbers it decided on. A candidate is promoted only if every check passes (thresholds: `registry.config`).

- beats_bicubic:    PSNR - bicubic PSNR >= min_gain_over_bicubic at every evaluated scale (metrics/eval.json)
- no_regression:    against the current production version on the same test split, PSNR and SSIM at most
                    max_psnr_regression / max_ssim_regression lower at every scale the production was scored at
- registered_copy:  the registered version, loaded back through MLflow, gives the same output as the local
                    checkpoints for the reference input and seed
- outputs_in_range: raw decoder output on the reference input finite, and at most max_out_of_range of it more
                    than range_margin outside [0, 1]
- latency:          median reference-input latency at the default DDIM steps within latency_budget_ms
- consistent:       at every evaluated scale, the output shrunk back by the degradation function against its own
                    LR (hndsr.consistency, metrics/eval.json): shift <= max_shift_px, spectral angle <=
                    max_spectral_angle_deg, normalised RMSE <= max_consistency_nrmse; none of it needs HR truth
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from hndsr.reference import reference_input
from registry.config import PromoteParams


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def beats_bicubic(scores: dict[str, dict], params: PromoteParams) -> Check:
    margins = {scale: round(v["psnr"] - v["bicubic_psnr"], 4) for scale, v in scores.items()}
    failing = {s: m for s, m in margins.items() if m < params.min_gain_over_bicubic}
    if not margins:
        return Check("beats_bicubic", False, "the evaluation holds no scales", {})
    worst = min(margins, key=margins.get)
    if failing:
        detail = ", ".join(f"x{s} {m:+.2f} dB" for s, m in failing.items())
        return Check("beats_bicubic", False, f"PSNR gain over bicubic below {params.min_gain_over_bicubic} dB at "
                     f"{detail}", {"gain_db": margins})
    return Check("beats_bicubic", True, f"PSNR gain over bicubic >= {params.min_gain_over_bicubic} dB at every "
                 f"scale (least: x{worst} {margins[worst]:+.2f} dB)", {"gain_db": margins})


CONSISTENCY = (("shift_px", "max_shift_px", "shift {:.4f} LR px"),
               ("spectral_angle_deg", "max_spectral_angle_deg", "spectral angle {:.3f} deg"),
               ("consistency_nrmse", "max_consistency_nrmse", "shrink-back RMSE {:.4f} of the range"))


def consistent(scores: dict[str, dict], params: PromoteParams) -> Check:
    """The output did not shift, change colour or invent values: bounds on eval.json's consistency figures."""
    missing = sorted(s for s, v in scores.items() if any(key not in v for key, _, _ in CONSISTENCY))
    if not scores or missing:
        return Check("consistent", False, "the evaluation has no consistency figures"
                     + (f" at x{', x'.join(missing)}" if missing else "") + ": re-run `dvc repro` (stage evaluate)")
    failing = [f"x{scale} " + label.format(values[key]) + f" > {getattr(params, limit)}"
               for scale, values in scores.items() for key, limit, label in CONSISTENCY
               if values[key] > getattr(params, limit)]
    figures = {scale: {key: values[key] for key, _, _ in CONSISTENCY} for scale, values in scores.items()}
    if failing:
        return Check("consistent", False, "the output is not consistent with its input: " + ", ".join(failing),
                     figures)
    worst = {key: max(v[key] for v in figures.values()) for key, _, _ in CONSISTENCY}
    return Check("consistent", True, "shrunk back, the output matches its input at every scale (worst: "
                 + ", ".join(label.format(worst[key]) for key, _, label in CONSISTENCY) + ")", figures)


def no_regression(candidate: dict[str, dict], production: dict[str, dict] | None, production_version: str | None,
                  params: PromoteParams, *, split_note: str = "") -> Check:
    """Compare per-scale PSNR/SSIM with the production version's, on the same split (the caller makes sure)."""
    if production_version is None:
        return Check("no_regression", True, "no production version yet: nothing to regress against", {})
    assert production is not None
    missing = sorted(set(production) - set(candidate), key=float)
    if missing:
        return Check("no_regression", False, f"cannot compare with production v{production_version}: the candidate "
                     f"was not evaluated at scale(s) {', '.join('x' + s for s in missing)}",
                     {"production_version": production_version})
    deltas, failing = {}, []
    for scale in sorted(production, key=float):
        d_psnr = round(candidate[scale]["psnr"] - production[scale]["psnr"], 4)
        d_ssim = round(candidate[scale]["ssim"] - production[scale]["ssim"], 5)
        deltas[scale] = {"psnr": d_psnr, "ssim": d_ssim}
        if d_psnr < -params.max_psnr_regression:
            failing.append(f"x{scale} PSNR {d_psnr:+.3f} dB")
        if d_ssim < -params.max_ssim_regression:
            failing.append(f"x{scale} SSIM {d_ssim:+.4f}")
    values = {"production_version": production_version, "delta": deltas}
    where = f" {split_note}" if split_note else ""
    if failing:
        return Check("no_regression", False, f"worse than production v{production_version}{where} beyond the "
                     f"tolerance ({params.max_psnr_regression} dB, SSIM {params.max_ssim_regression}): "
                     + ", ".join(failing), values)
    worst = min(deltas, key=lambda s: deltas[s]["psnr"])
    return Check("no_regression", True, f"within tolerance of production v{production_version}{where} at every "
                 f"scale (least PSNR change: x{worst} {deltas[worst]['psnr']:+.3f} dB)", values)


def registered_copy(local_model, registered_model, params: PromoteParams, version: str) -> Check:
    """The registered version must reproduce the local checkpoints exactly (same input, scale and seed)."""
    lr = reference_input(local_model.data.channels)
    local = local_model.super_resolve(lr, params.reference_scale, seed=params.seed)
    loaded = registered_model.super_resolve(lr, params.reference_scale, seed=params.seed)
    max_diff = (local - loaded).abs().max().item() if local.shape == loaded.shape else float("inf")
    values = {"max_abs_diff": max_diff, "shape": list(loaded.shape)}
    if max_diff == 0.0:
        return Check("registered_copy", True, f"version {version} loaded back from the registry gives the same "
                     "output as the checkpoints", values)
    return Check("registered_copy", False, f"version {version} loaded back from the registry differs from the "
                 f"checkpoints (max |diff| {max_diff:.3g})", values)


def outputs_in_range(model, params: PromoteParams) -> Check:
    lr = reference_input(model.data.channels)
    raw = model.super_resolve(lr, params.reference_scale, seed=params.seed, clamp=False)
    finite = bool(torch.isfinite(raw).all())
    outside = ((raw < -params.range_margin) | (raw > 1 + params.range_margin)).float().mean().item() if finite else 1.0
    values = {"finite": finite, "min": raw.min().item() if finite else None,
              "max": raw.max().item() if finite else None, "out_of_range_fraction": round(outside, 6)}
    if not finite:
        return Check("outputs_in_range", False, "the output holds NaN or infinite values", values)
    if outside > params.max_out_of_range:
        return Check("outputs_in_range", False, f"{outside:.2%} of output values lie more than {params.range_margin} "
                     f"outside [0, 1] (allowed {params.max_out_of_range:.2%})", values)
    return Check("outputs_in_range", True, f"finite; values in [{values['min']:.3f}, {values['max']:.3f}], "
                 f"{outside:.3%} beyond the margin", values)


def latency(model, params: PromoteParams) -> Check:
    lr = reference_input(model.data.channels)
    model.super_resolve(lr, params.reference_scale, seed=params.seed)  # warm-up
    times = []
    for _ in range(params.latency_repeats):
        start = time.perf_counter()
        model.super_resolve(lr, params.reference_scale, seed=params.seed)
        times.append((time.perf_counter() - start) * 1000)
    median = statistics.median(times)
    steps = model.defaults.steps
    values = {"median_ms": round(median, 1), "runs_ms": [round(t, 1) for t in times], "steps": steps,
              "threads": torch.get_num_threads(), "budget_ms": params.latency_budget_ms}
    what = f"{tuple(lr.shape[-2:])} input at x{params.reference_scale:g}, {steps} DDIM steps"
    if median > params.latency_budget_ms:
        return Check("latency", False, f"median {median:.0f} ms for a {what} exceeds the budget of "
                     f"{params.latency_budget_ms:.0f} ms", values)
    return Check("latency", True, f"median {median:.0f} ms for a {what} (budget {params.latency_budget_ms:.0f} ms)",
                 values)
