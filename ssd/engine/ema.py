"""An exponential moving average of a model's weights (the ``photos`` recipe scores and saves it).

After each optimizer step every floating-point entry of the state dict (weights and batch-norm
statistics) moves ``e <- d e + (1 - d) w`` with ``d = decay (1 - exp(-updates / ramp))``: early on, when
the weights change fast, the average follows them closely, later it smooths over about
``1 / (1 - decay)`` steps. Integer entries (batch norm's step count) are copied. The average is a plain
copy of the module (``module``), on the model's device, never trained; its state (the average and the
update count) goes into checkpoints, so a resumed run averages as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``module``: the average of ``model`` (a copy made now, in eval mode, without gradients)."""

    def __init__(self, model: nn.Module, decay: float, ramp: float = 100.0) -> None:
        if not 0.0 <= decay < 1.0 or ramp <= 0:
            raise ValueError(f"EMA decay must be in [0, 1) and ramp > 0, got {decay}, {ramp}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, 0

    def factor(self) -> float:
        """The ``d`` of the next update."""
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (same architecture as at creation)."""
        d = self.factor()
        self.updates += 1
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([mine[k] for k in floats], [theirs[k].detach() for k in floats], 1.0 - d)
        for key, value in mine.items():
            if not value.dtype.is_floating_point:
                value.copy_(theirs[key])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
