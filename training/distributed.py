"""Data-parallel training under `torchrun` (DistributedDataParallel): one process per GPU, or per CPU slot with
the gloo backend, on one machine or several.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; `init()` joins the process group from them (NCCL on CUDA, gloo
on the CPU). Every rank trains the same trial: rank 0 draws it from the Optuna study and sends the hyperparameters
to the others (`send_trial`), each rank computes its share of every batch (`shard`; the global batch is the
params' `batch_size`, cut into equal shares), DDP averages the gradients, and rank 0 alone evaluates, reports to
Optuna, logs to MLflow and writes checkpoints, sending its pruning decision after every evaluation
(`send_decision`). Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op for one process.

Every rank's software (the project's code hash, Python, torch, numpy) must be rank 0's: `init` refuses a group
where one differs, on every rank, with a message that names the rank and its host.

Determinism on the CPU: for a fixed world size, a run repeats exactly (gloo sums the gradients in a fixed order).
Different world sizes draw the same batches but sum gradients in another order, so they agree to rounding only.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from training.errors import TrainingError

log = logging.getLogger("hndsr.distributed")

TIMEOUT = datetime.timedelta(minutes=30)  # a rank waiting longer than this for the others gives up


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def init(cuda: bool) -> World:
    """Join the process group torchrun describes in the environment; one process without it."""
    global _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _world = World()
        return _world
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _same_software(size)
    _world = World(rank, size, local_rank)
    log.info("rank %d of %d (local rank %d, backend %s)", rank, size, local_rank, dist.get_backend())
    return _world


def _same_software(size: int) -> None:
    """Every rank, on whichever node: refuse (all ranks alike) a group whose ranks run other software than rank 0
    (`hndsr.provenance.software`): another code or torch version would train something else than one process."""
    import socket

    from hndsr import provenance

    everyone: list = [None] * size
    dist.all_gather_object(everyone, (socket.gethostname(), provenance.software()))
    first_host, first = everyone[0]
    try:
        for rank, (host, theirs) in enumerate(everyone[1:], start=1):
            provenance.check_same_software(f"rank {rank} (on {host})", theirs, first, than=f"rank 0 (on {first_host})")
    except provenance.SoftwareMismatch:
        dist.destroy_process_group()
        raise


def finish() -> None:
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def wrap(network: nn.Module) -> nn.Module:
    """The module to train: `network` itself for one process, else a DistributedDataParallel around it that
    averages gradients over the ranks (evaluation keeps using `network`, whose weights DDP keeps in sync)."""
    if not _world.active:
        return network
    device = next(network.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def shard(batch_size: int) -> tuple[int, int]:
    """This rank's rows [start, stop) of a global batch of `batch_size`."""
    if batch_size % _world.size:
        raise TrainingError(f"batch_size {batch_size} does not divide into {_world.size} equal shares (one per "
                            "process of torchrun); choose a multiple of the world size")
    share = batch_size // _world.size
    return _world.rank * share, (_world.rank + 1) * share


def _broadcast(value=None):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(value):
    """Rank 0's `value` on every rank (itself for one process)."""
    return _broadcast(value) if _world.active else value


def send_trial(trial: tuple[dict, int] | None) -> None:
    """Rank 0: the next trial's (hyperparameters, seed) to the other ranks, or None when the sweep is over."""
    if _world.active:
        _broadcast(trial)


def receive_trial() -> tuple[dict, int] | None:
    return _broadcast()


def send_decision(stop: bool) -> None:
    """Rank 0, after each evaluation: whether the trial stops there (pruned) or goes on."""
    if _world.active:
        _broadcast(stop)


def receive_decision() -> bool:
    return bool(_broadcast())
