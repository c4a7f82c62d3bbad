"""Training recipes (``train.recipe``): what ``book`` and ``photos`` change, in one place.

``book`` is the seed's recipe, exactly as before this knob existed: the loss of ``ssd.core.loss.calc_loss``,
the anchors of ``model.sizes``/``model.ratios``, the book's TinySSD, and the optimizer, schedule and
augmentation the ``train`` params say; evaluation and prediction use the ``evaluate`` params.

``photos`` is a recipe for real photos (few images, many boxes of any shape), measured in
docs/performance.md. It fixes its own numbers, so the ``train`` params it replaces (``batch_size``, ``lr``,
``weight_decay``, ``momentum``, ``augment``, ``lr_schedule``, ``warmup_epochs``) and ``model.sizes``/``ratios``
do not apply to it; the others (epochs, precision, processes, ...) do:

- loss: ``ssd.core.loss.detection_loss`` (hard negatives 3:1, 5 x GIoU + smooth L1 on positive anchors,
  divided by the positives);
- anchors fitted to the training boxes (``ssd.core.anchor_fit``) instead of ``model.sizes``/``model.ratios``;
- TinySSD with top-down fusion of its scales and ``width`` times its channels;
- augmentation ``ssd.core.augment.photos_augment`` (mosaic, colour, zoom out, crop, flip);
- AdamW with linear warm-up and cosine decay, batch ``batch_size``, and an EMA of the weights
  (``ssd.engine.ema``), which is what gets saved;
- detection: NMS per class at ``nms_threshold``; the display threshold is the one of best F1 on the
  validation precision-recall curve (``ssd evaluate`` states it in eval.json; a model file alone
  suggests ``display_threshold``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ssd.util.settings import NMS_MODES, RECIPES

BOOK, PHOTOS = RECIPES


@dataclass(frozen=True)
class Recipe:
    """The ``photos`` recipe's numbers (``book`` takes its numbers from the params)."""
    batch_size: int = 16
    giou_weight: float = 5.0    # of the box error's GIoU term (smooth L1 of the offsets weighs 1)
    lr: float = 2e-3            # AdamW
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    ema_decay: float = 0.998
    width: float = 1.0
    fusion: bool = True
    nms_threshold: float = 0.5
    display_threshold: float = 0.4

    def warmup(self, epochs: int) -> float:
        """Warm-up epochs of a run of ``epochs``: ``warmup_epochs``, at most a tenth of the run."""
        return min(self.warmup_epochs, epochs / 10)


PHOTOS_RECIPE = Recipe()


def is_photos(recipe: str) -> bool:
    """Whether ``recipe`` (a ``train.recipe`` value) is ``photos``; anything else but ``book`` is refused."""
    if recipe not in RECIPES:
        raise ValueError(f"train.recipe={recipe!r}: expected one of {', '.join(RECIPES)}")
    return recipe == PHOTOS


def detection_settings(recipe: str | None) -> dict[str, Any]:
    """What a model trained with ``recipe`` says about detecting with it, as params keys (``{}`` for
    ``book`` or an unknown recipe: the ``evaluate`` params decide, as before recipes existed)."""
    if recipe != PHOTOS:
        return {}
    return {"evaluate.nms": NMS_MODES[1], "evaluate.nms_threshold": PHOTOS_RECIPE.nms_threshold,
            "evaluate.threshold": PHOTOS_RECIPE.display_threshold}


def picks_threshold(recipe: str | None) -> bool:
    """Whether the display threshold of a model trained with ``recipe`` is chosen on the validation
    precision-recall curve (``ssd.engine.metrics.best_f1``) rather than taken from ``evaluate.threshold``."""
    return recipe == PHOTOS
