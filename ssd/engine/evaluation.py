"""Score a model on a validation split, and write the evaluation's reports.

:func:`score` is the one scoring path: the evaluate stage (``ssd.stages.evaluate``) uses it for the
trained model and the registry for a champion re-scored on the current validation split. Its
metrics (``reports/eval.json``, DVC metrics; definitions in ``ssd.engine.metrics``):

- ``map_50``, ``map``, ``precision``, ``recall`` (at ``evaluate.threshold``), ``per_class``,
  ``confusion``;
- ``class_err``, ``bbox_mae``: the seed's training metrics on the validation split;
- ``threshold``, ``num_images``, ``num_objects``.

``evaluate.nms`` picks class-agnostic (the book's) or per-class NMS. :func:`write_reports` writes
``eval.json``, ``pr_curve.csv`` (DVC plot of precision against recall over score thresholds) and
the pictures (``ssd.engine.figures``) under ``pictures/``.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ssd.core.anchors import decode_outputs, multibox_target
from ssd.core.loss import bbox_eval, cls_eval
from ssd.core.model import as_input
from ssd.engine.inference import PER_CLASS_NMS
from ssd.engine.metrics import MAX_DETECTIONS, confusion_matrix, confusion_summary, detection_metrics, per_class_ap
from ssd.util.files import atomic_dir, atomic_save_figure, atomic_write_json, atomic_write_text
from ssd.util.settings import DataSettings, EvaluateSettings

EVAL_BATCH = 32  # images per forward pass when scoring


def run_model(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, nms_threshold: float,
              batch_size: int = 32, per_class: bool = False) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Detections (normalised, ``Tensor[K, 6]`` per image) and the seed's ``class_err``/``bbox_mae``.

    ``images uint8 Tensor[N, 3, S, S]``, ``labels Tensor[N, M, 5]``: a split in memory.
    """
    batches = ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size))
    preds, _, seed_metrics = run_batches(net, batches, nms_threshold, per_class)
    return preds, seed_metrics


@torch.inference_mode()
def run_batches(net: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], nms_threshold: float,
                per_class: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
    """:func:`run_model` over batches ``(uint8 Tensor[B, 3, S, S], Tensor[B, M, 5])`` as a loader gives
    them; also returns each image's label rows without padding (``Tensor[k, 5]``, normalised): only
    these and the detections outlive a batch, so memory does not follow the split's size."""
    device = next(net.parameters()).device
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    correct = anchors_seen = abs_err = offsets_seen = 0.0
    for X, labels in batches:
        Y = labels.to(device)
        anchors, cls_preds, bbox_preds = net(as_input(X, device))
        bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, Y)
        correct += float(cls_eval(cls_preds, cls_labels))
        anchors_seen += cls_labels.numel()
        abs_err += float(bbox_eval(bbox_preds, bbox_labels, bbox_masks))
        offsets_seen += bbox_labels.numel()
        # Copies: each image's rows are a view of every row NMS kept for it (thousands for a weak
        # model), which would otherwise stay in memory for the whole split.
        preds += [rows.clone() for rows in decode_outputs(anchors, cls_preds, bbox_preds, nms_threshold,
                                                          MAX_DETECTIONS, per_class=per_class)]
        targets += [rows[rows[:, 0] >= 0] for rows in labels]  # a copy, without the batch's padding
    return preds, targets, {"class_err": 1 - correct / max(anchors_seen, 1), "bbox_mae": abs_err / max(offsets_seen, 1)}


def write_reports(reports: Path, metrics: dict[str, Any], curve: Sequence[dict[str, float]],
                  figures: dict[str, Any]) -> dict[str, Path]:
    """Write every evaluation output atomically (``figures``: file name -> figure, under
    ``pictures/``); returns their paths."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["threshold", "recall", "precision"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve)
    paths = {"metrics": reports / "eval.json", "pr_curve": reports / "pr_curve.csv",
             "pictures": reports / "pictures"}
    with atomic_dir(paths["pictures"]) as tmp:
        for name, fig in figures.items():
            atomic_save_figure(fig, tmp / name)
    atomic_write_text(paths["pr_curve"], buffer.getvalue())
    atomic_write_json(paths["metrics"], metrics)
    return paths


@dataclass(frozen=True)
class Scores:
    """A model's results on a validation split: the stage's ``metrics``, the detections per image
    normalised (``preds``) and in pixels with the pixel ground truth (for the curve), and how
    long the model took over the split (``seconds``, images decoded by ``workers`` processes)."""
    metrics: dict[str, Any]
    preds: list[torch.Tensor]
    pixel_preds: list[torch.Tensor]
    pixel_targets: list[torch.Tensor]
    seconds: float = 0.0
    workers: int = 0

    @property
    def images_per_s(self) -> float:
        return len(self.preds) / max(self.seconds, 1e-9)


def load_validation(data: DataSettings, data_root: str | Path) -> Any:
    """The validation split of ``data_root`` as the evaluate stage reads it: its label index, images
    decoded on demand (``StreamDataset``)."""
    from ssd.data.dataset import STREAM, open_split
    from ssd.data.labels import LabelLimits

    dataset = open_split(data_root, "val", data.image_size, data.classes, data.max_image_pixels,
                         LabelLimits.of(data), STREAM)
    if len(dataset) == 0:
        raise ValueError(f"{dataset.split_dir}: the validation split is empty")
    return dataset


def score(net: torch.nn.Module, dataset: Any, cfg: EvaluateSettings, workers: int | None = None) -> Scores:
    """Run ``net`` over ``dataset`` (on the GPU when there is one) and compute the stage's metrics
    (``cfg``: ``threshold``, ``nms_threshold``, ``nms``).

    Batches of 32 in the split's order, labels padded per batch, images decoded by ``workers``
    DataLoader processes (None: sized from the machine, none for a small split); either dataset
    of ``ssd.data.dataset`` gives the same metrics."""
    from ssd.data.dataset import make_loader, pass_workers

    threshold, nms_threshold = float(cfg.threshold), float(cfg.nms_threshold)
    net = net.to("cuda" if torch.cuda.is_available() else "cpu")
    workers = pass_workers(len(dataset)) if workers is None else workers
    loader = make_loader(dataset, EVAL_BATCH, shuffle=False, num_workers=workers,
                         pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)
    started = time.perf_counter()
    preds, targets, seed_metrics = run_batches(net, loader, nms_threshold, per_class=cfg.nms == PER_CLASS_NMS)
    seconds = time.perf_counter() - started

    # Pixel boxes: IoU is the same, and COCO's small/medium/large areas mean something.
    size = dataset.image_size
    pixel_preds = [p * torch.tensor([1, 1, size, size, size, size]) for p in preds]
    pixel_targets = [t * torch.tensor([1, size, size, size, size]) for t in targets]
    metrics: dict[str, Any] = {**detection_metrics(pixel_preds, pixel_targets, threshold), **seed_metrics,
                               "threshold": threshold, "num_images": len(dataset),
                               "num_objects": sum(len(t) for t in targets),
                               "per_class": per_class_ap(pixel_preds, pixel_targets, dataset.classes),
                               "confusion": confusion_summary(
                                   confusion_matrix(pixel_preds, pixel_targets, len(dataset.classes)),
                                   dataset.classes)}
    return Scores(metrics, preds, pixel_preds, pixel_targets, seconds, workers)
