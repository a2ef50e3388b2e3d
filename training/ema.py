"""Exponential moving average (EMA) of a network's weights.

Averaging the weights of the last few hundred steps smooths out the noise of the final optimiser steps, which at
the small batches of a CPU run is worth a measurable share of a dB. The trainers evaluate the averaged weights and
hand them to the checkpoint, so what validation scored is what is saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights, after every optimiser step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early steps (random weights) are
    forgotten quickly. Buffers (none in these networks) would be copied, not averaged."""

    def __init__(self, network: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in network.parameters()]

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach() for p in network.parameters()], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, network: nn.Module) -> None:
        """Replace the network's weights by the averaged ones."""
        for param, averaged in zip(network.parameters(), self.shadow, strict=True):
            param.copy_(averaged)

    @contextlib.contextmanager
    def applied(self, network: nn.Module) -> Iterator[None]:
        """The averaged weights in `network` for the duration (an evaluation), the trained ones back after."""
        trained = [p.detach().clone() for p in network.parameters()]
        self.copy_to(network)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(network.parameters(), trained, strict=True):
                    param.copy_(value)
