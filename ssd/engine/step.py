"""One training step, the one that ``ssd train``, the benchmarks and the tests all run.

:func:`train_step` is a whole optimizer step on one batch: the recipe's loss under autocast
(:func:`forward_loss`; ``train.recipe``: the seed's for ``book``), the step hooks, backward through the
loss scaler and the optimizer's step.
:class:`Tally` adds up an epoch's steps on the device, so that no step waits for the host.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ssd.core.anchors import multibox_target
from ssd.core.loss import bbox_eval, calc_loss, cls_eval, detection_loss
from ssd.core.model import as_input
from ssd.core.recipe import BOOK, PHOTOS_RECIPE, is_photos

NO_BAD_STEP = sys.maxsize  # Tally.first_bad while every loss has been finite


# ----------------------------------------------------------------------------------------------
# Step hooks: see a batch and its loss, or replace the loss (tests inject faults this way)

@dataclass
class TrainStep:
    """What a step hook sees: the step (epoch and step count from 1), this process's batch
    (``uint8 Tensor[b, 3, S, S]``), its loss before backward, and the module being trained."""
    epoch: int
    step: int
    images: torch.Tensor
    loss: torch.Tensor
    model: nn.Module


StepHook = Callable[[TrainStep], "torch.Tensor | None"]
_step_hooks: list[StepHook] = []


def register_step_hook(hook: StepHook) -> Callable[[], None]:
    """Call ``hook(TrainStep)`` at every training step, between forward and backward.

    A tensor returned replaces the loss (a test makes it NaN, say); ``None`` keeps it. Returns a
    function that removes the hook.
    """
    _step_hooks.append(hook)
    return lambda: _step_hooks.remove(hook) if hook in _step_hooks else None


def _run_step_hooks(step: TrainStep) -> torch.Tensor:
    for hook in list(_step_hooks):
        replaced = hook(step)
        step.loss = step.loss if replaced is None else replaced
    return step.loss


# ----------------------------------------------------------------------------------------------
# The step

def forward_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False, recipe: str = BOOK
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of ``recipe`` (``train.recipe``; ``book``: the seed's) and metric sums for one batch.

    Args:
        images: ``uint8 Tensor[B, 3, S, S]``; labels: ``Tensor[B, M, 5]`` (already checked, so
            ``multibox_target`` skips its per-batch host sync).

    Returns:
        ``loss`` (0-dim, mean over the batch) and ``float64 Tensor[6]``: summed per-example loss,
        examples, correctly classified anchors, anchors, summed abs bbox error, bbox label count.
    """
    X = as_input(images, channels_last=channels_last)
    autocast = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    with autocast:
        anchors, cls_preds, bbox_preds = model(X)
    bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, labels, check=False)
    if is_photos(recipe):
        per_example = detection_loss(anchors, cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks,
                                     giou_weight=PHOTOS_RECIPE.giou_weight)
    else:
        per_example = calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    with torch.no_grad():
        # The counts are shapes, known on the host: filled on the device (a kernel), never copied
        # from the host (``torch.tensor(..., device=...)`` would be a synchronizing copy each step).
        sums = torch.stack([per_example.detach().sum().double(), cls_eval(cls_preds, cls_labels).double(),
                            bbox_eval(bbox_preds, bbox_labels, bbox_masks).double()])
        counts = [torch.full((), float(n), dtype=torch.float64, device=images.device)
                  for n in (len(images), cls_labels.numel(), bbox_labels.numel())]
        stats = torch.stack([sums[0], counts[0], sums[1], counts[1], sums[2], counts[2]])
    return per_example.mean(), stats


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, labels: torch.Tensor, *, autocast_dtype: torch.dtype | None = None,
               channels_last: bool = False, epoch: int = 0, step: int = 0, recipe: str = BOOK
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch (shapes and ``recipe`` as :func:`forward_loss`); ``epoch`` and
    ``step`` are what the step hooks see.

    Returns the loss the step took (0-dim, detached; a hook may have replaced it) and the batch's
    metric sums ``float64 Tensor[6]``. Nothing here reads a tensor on the host.
    """
    loss, stats = forward_loss(model, images, labels, autocast_dtype=autocast_dtype, channels_last=channels_last,
                               recipe=recipe)
    if _step_hooks:
        loss = _run_step_hooks(TrainStep(epoch, step, images, loss, model))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), stats


class Tally:
    """An epoch's steps added up on ``device``: ``sums``, :func:`forward_loss`'s metric sums
    (``float64 Tensor[6]``), and ``first_bad``, the first step whose loss was not finite
    (``NO_BAD_STEP`` while none). Read them on the host only now and then: each read waits for the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)

    def add(self, step: int, loss: torch.Tensor, stats: torch.Tensor) -> None:
        self.sums += stats
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad < NO_BAD_STEP), self.first_bad, step)
