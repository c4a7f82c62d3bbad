"""Learning-rate schedules (``train.lr_schedule``, ``train.warmup_epochs``), stepped once per iteration.

``constant`` (the book's recipe: ``train.lr`` throughout) or ``cosine`` (half a cosine from
``train.lr`` down to 0 over the run). Either starts with a linear warm-up over ``warmup_epochs``
(0: none) from ``lr / warmup_steps`` up to ``lr``. The scheduler steps after every optimizer step,
not every epoch: a small dataset has only a few iterations per epoch, and an epoch-wise warm-up
would jump in a few coarse stairs. The factor is a pure function of the global iteration, so a
resumed run rebuilds its scheduler from the iteration it resumes at (``start_step``) and needs
no scheduler state in the checkpoint.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ssd.util.settings import LR_SCHEDULES


def lr_factor(kind: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The multiplier of the base lr at iteration ``step`` (0-based) as a function.

    Raises ``ValueError`` naming a bad ``kind`` or step count.
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={kind!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"lr schedule: need 0 <= warm-up steps ({warmup_steps}) <= total steps ({total_steps}) "
                         f"and total >= 1 (train.warmup_epochs must not exceed train.epochs)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, epochs: int, steps_per_epoch: int,
                   warmup_epochs: float = 0, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``epochs * steps_per_epoch`` iterations, positioned at ``start_step``
    (the iterations already done on a resume); call ``.step()`` after each ``optimizer.step()``.

    ``constant`` without warm-up leaves every lr exactly as it is (factor 1.0).
    """
    factor = lr_factor(kind, epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch))
    for group in optimizer.param_groups:  # LambdaLR needs it to start anywhere but the beginning
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
