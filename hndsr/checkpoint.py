"""Checkpoint format: `config.json` (constructor arguments, code version, lineage) + `model.safetensors`.

The autoencoder's config.json also carries `data`: the bands and radiometry the model was trained on
(`hndsr.raster.DataSpec`; absent in older checkpoints, which are RGB with the fixed default scales).

Loading rebuilds each network from its saved config, never from params.yaml, and never unpickles anything.
Each stage's config.json records the SHA-256 of the upstream weights it was trained on, so a model assembled
from checkpoints of different runs is refused instead of silently producing garbage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import hndsr
from hndsr.config import ConfigError, from_mapping
from hndsr.errors import UserError
from hndsr.model import HNDSR, SamplingDefaults
from hndsr.networks import (
    Autoencoder,
    AutoencoderConfig,
    DiffusionUNet,
    NeuralOperator,
    OperatorConfig,
    UNetConfig,
)
from hndsr.raster import DataSpec
from hndsr.scheduler import DDIMConfig, DDIMScheduler

WEIGHTS, CONFIG = "model.safetensors", "config.json"
STAGES = {
    "autoencoder": (AutoencoderConfig, Autoencoder),
    "operator": (OperatorConfig, NeuralOperator),
    "diffusion": (UNetConfig, DiffusionUNet),
}
UPSTREAM = {"autoencoder": [], "operator": ["autoencoder"], "diffusion": ["autoencoder", "operator"]}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit with the others; the message says what to re-run."""


def weights_hash(directory: str | Path) -> str:
    return hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()


def save_network(directory: str | Path, stage: str, network: nn.Module, *, extra: dict | None = None) -> None:
    """Write `network` (whose `.config` is its constructor dataclass) as a checkpoint of `stage`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    # No safetensors metadata: the library writes its keys in no fixed order, which would make identical
    # weights hash differently (config.json carries the stage and code version instead).
    save_file(state, str(directory / WEIGHTS))
    meta = {"stage": stage, "code_version": hndsr.__version__, "config": asdict(network.config), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_config(directory: str | Path, stage: str) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file() or not (Path(directory) / WEIGHTS).is_file():
        raise CheckpointError(f"no {stage} checkpoint in {directory}: run `dvc repro` (stage train_{stage}) first")
    meta = json.loads(path.read_text())
    if meta.get("stage") != stage:
        raise CheckpointError(f"{directory} holds a {meta.get('stage')!r} checkpoint, expected {stage!r}")
    return meta


def load_network(directory: str | Path, stage: str) -> tuple[nn.Module, dict]:
    """Rebuild the network of `stage` from its config.json and load its weights. Returns (network, meta)."""
    meta = read_config(directory, stage)
    config_cls, network_cls = STAGES[stage]
    try:
        config = from_mapping(config_cls, meta["config"], where=f"{directory}/{CONFIG}:config")
    except ConfigError as exc:
        raise CheckpointError(f"{stage} checkpoint config does not fit this code version: {exc}") from None
    network = network_cls(config)
    path = Path(directory) / WEIGHTS
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as exc:  # a corrupt header, a truncated or missing file
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); restore it "
                              "with `dvc checkout` or re-run `dvc repro`") from None
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"{path} does not fit its {CONFIG} ({str(exc).splitlines()[0]}); re-run "
                              "`dvc repro`") from None
    return network.eval(), meta


def check_upstream(meta: dict, stage: str, models_dir: str | Path) -> None:
    """Raise CheckpointError unless every upstream checkpoint is the one `stage` was trained on."""
    recorded = meta.get("upstream", {})
    for upstream in UPSTREAM[stage]:
        current = weights_hash(Path(models_dir) / upstream)
        if recorded.get(upstream) != current:
            raise CheckpointError(
                f"the {stage} checkpoint was trained on a different {upstream} checkpoint than the one in "
                f"{models_dir}/{upstream}; re-run `dvc repro` so train_{stage} trains on the current one"
            )


def upstream_hashes(stage: str, models_dir: str | Path) -> dict[str, str]:
    return {name: weights_hash(Path(models_dir) / name) for name in UPSTREAM[stage]}


def load_model(models_dir: str | Path, *, with_diffusion: bool = True) -> HNDSR:
    """Assemble the composed model from `models_dir/{autoencoder,operator,diffusion}`, checking lineage."""
    models_dir = Path(models_dir)
    autoencoder, ae_meta = load_network(models_dir / "autoencoder", "autoencoder")
    operator, op_meta = load_network(models_dir / "operator", "operator")
    check_upstream(op_meta, "operator", models_dir)
    try:
        data = DataSpec.from_config(ae_meta.get("data"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{models_dir}/autoencoder/{CONFIG}: unreadable `data` entry ({exc}); "
                              "re-run `dvc repro`") from None
    if not data.channels == autoencoder.config.channels == operator.config.channels:
        raise CheckpointError(f"{models_dir}: the checkpoints disagree on the band count (data spec "
                              f"{data.channels}, autoencoder {autoencoder.config.channels}, operator "
                              f"{operator.config.channels}); re-run `dvc repro`")
    unet, defaults, scheduler_config = None, SamplingDefaults(steps=0), DDIMConfig()
    if with_diffusion:
        unet, diff_meta = load_network(models_dir / "diffusion", "diffusion")
        check_upstream(diff_meta, "diffusion", models_dir)
        defaults = from_mapping(SamplingDefaults, diff_meta["sampling"], where="diffusion config.json:sampling")
        scheduler_config = from_mapping(DDIMConfig, diff_meta["scheduler"], where="diffusion config.json:scheduler")
    low, high = op_meta["scale_range"]
    return HNDSR(autoencoder, operator, unet, DDIMScheduler(scheduler_config), min_scale=low, max_scale=high,
                 defaults=defaults, data=data).eval()
