"""Detection metrics on per-image detections and ground truth: COCO mAP, precision/recall, per class, confusion.

Shapes throughout: detections per image ``Tensor[K, 6]`` rows ``(class_id, score, x1, y1, x2, y2)``,
ground truth per image ``Tensor[M, 5]`` rows ``(class, x1, y1, x2, y2)`` (class < 0 is padding).

- ``map_50``, ``map``: COCO mAP@0.5 and mAP@[.5:.95] from torchmetrics' ``MeanAveragePrecision``
  (pycocotools backend; at most 100 detections per image, as COCO);
- ``precision``, ``recall``: at a score threshold; a detection is a true positive if its IoU with a
  not yet matched ground-truth box of its class is >= 0.5 (detections taken in decreasing score);
- ``per_class``: for each class name ``{"ap50", "ap", "num_objects"}``, COCO's AP@0.5 and
  AP@[.5:.95] of that class alone (-1 for a class with no ground truth, COCO's convention);
- ``best_f1``: the point of the precision-recall curve with the best F1 (a display threshold chosen on it);
- ``confusion``: ``matrix[t][p]`` counts the ground-truth boxes of class ``t`` whose top-scoring
  detection at IoU >= 0.5 (any score) has class ``p``; the last column (``none``) those with no
  detection there; ``confused`` lists the off-diagonal pairs, most frequent first.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

from ssd.core.boxes import box_iou

MATCH_IOU = 0.5
MAX_DETECTIONS = 100  # COCO's largest maxDets: more would not change mAP
CURVE_THRESHOLDS = [i / 100 for i in range(101)]  # the score thresholds of the precision-recall curve


def coco_map(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@[.5:.95] (torchmetrics with pycocotools).

    Args:
        preds: per image ``Tensor[K, 6]`` rows ``(class_id, score, x1, y1, x2, y2)``.
        targets: per image ``Tensor[M, 5]`` rows ``(class, x1, y1, x2, y2)``; class < 0 is padding.
        Boxes in any one scale (IoU does not depend on it); pixels keep COCO's area ranges meaningful.

    Returns ``{"map_50", "map"}``; -1 when there is no ground truth at all (COCO's convention).
    """
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update(
        [{"boxes": p[:, 2:].float(), "scores": p[:, 1].float(), "labels": p[:, 0].long()} for p in preds],
        [{"boxes": t[t[:, 0] >= 0][:, 1:].float(), "labels": t[t[:, 0] >= 0][:, 0].long()} for t in targets])
    result = metric.compute()
    return {"map_50": float(result["map_50"]), "map": float(result["map"])}


def match_detections(pred: torch.Tensor, target: torch.Tensor, iou_threshold: float = MATCH_IOU) -> torch.Tensor:
    """Greedy matching, best score first: ``bool Tensor[K]``, True for a true positive.

    A detection is a true positive if its best-overlapping ground-truth box of the same class that
    is not yet matched has IoU >= ``iou_threshold``. ``pred Tensor[K, 6]``, ``target Tensor[M, 5]``.
    """
    target = target[target[:, 0] >= 0]
    tp = torch.zeros(len(pred), dtype=torch.bool)
    if len(pred) == 0 or len(target) == 0:
        return tp
    iou = box_iou(pred[:, 2:].double(), target[:, 1:].double())
    iou[pred[:, :1] != target[None, :, 0]] = -1.0   # other classes never match
    matched = torch.zeros(len(target), dtype=torch.bool)
    for k in torch.argsort(pred[:, 1], descending=True, stable=True).tolist():
        candidates = iou[k].masked_fill(matched, -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou_threshold:
            matched[best] = True
            tp[k] = True
    return tp


def precision_recall(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                     thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Precision and recall of the detections scoring >= each threshold.

    Where nothing is detected precision is 0 (scikit-learn's ``zero_division=0``), so an untrained
    model does not look precise; recall is 0 without ground truth.
    """
    num_truth = sum(int((t[:, 0] >= 0).sum()) for t in targets)
    scores = torch.cat([p[:, 1] for p in preds]) if preds else torch.empty(0)
    tp = (torch.cat([match_detections(p, t) for p, t in zip(preds, targets)]) if preds
          else torch.empty(0, dtype=torch.bool))
    curve = []
    for threshold in thresholds:
        kept = scores >= threshold
        n_tp, n_kept = int(tp[kept].sum()), int(kept.sum())
        curve.append({"threshold": float(threshold), "precision": n_tp / n_kept if n_kept else 0.0,
                      "recall": n_tp / num_truth if num_truth else 0.0})
    return curve


def best_f1(curve: Sequence[dict[str, float]]) -> dict[str, float]:
    """The point ``{"threshold", "precision", "recall", "f1"}`` of a :func:`precision_recall` curve with the
    highest F1 (the harmonic mean of precision and recall); on a tie the highest threshold, which shows
    fewer boxes for the same F1. ``ValueError`` for an empty curve."""
    if not curve:
        raise ValueError("best_f1: empty precision-recall curve")

    def f1(point: dict[str, float]) -> float:
        p, r = point["precision"], point["recall"]
        return 2 * p * r / (p + r) if p + r else 0.0

    best = max(curve, key=lambda point: (f1(point), point["threshold"]))
    return {"threshold": best["threshold"], "precision": best["precision"], "recall": best["recall"], "f1": f1(best)}


def detection_metrics(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                      threshold: float) -> dict[str, float]:
    """``map_50``, ``map``, ``precision`` and ``recall`` (at ``threshold``) of detections against truth.

    Shapes as in :func:`coco_map`. Precision/recall match greedily within each image, in
    decreasing score, after the detections per image are capped at COCO's 100.
    """
    preds = [p[torch.argsort(p[:, 1], descending=True, stable=True)][:MAX_DETECTIONS] for p in preds]
    (point,) = precision_recall(preds, targets, [threshold])
    return {**coco_map(preds, targets), "precision": point["precision"], "recall": point["recall"]}


def per_class_ap(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """COCO AP@0.5 (``ap50``) and AP@[.5:.95] (``ap``) of each class, and its ``num_objects``.

    Shapes as in :func:`coco_map`. COCO scores every class on its own (its detections against its
    boxes, per image), so each class's AP is the mAP of the data cut down to that class; a class
    without ground truth gets -1.
    """
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(classes):
        class_targets = [t[t[:, 0] == c] for t in targets]
        n = sum(len(t) for t in class_targets)
        ap = coco_map([p[p[:, 0] == c] for p in preds], class_targets) if n else {"map_50": -1.0, "map": -1.0}
        out[name] = {"ap50": ap["map_50"], "ap": ap["map"], "num_objects": n}
    return out


def confusion_matrix(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], num_classes: int,
                     iou_threshold: float = MATCH_IOU) -> torch.Tensor:
    """``int64 Tensor[C, C + 1]``: row = a ground-truth box's class, column = the class of the
    highest-scoring detection overlapping it at IoU >= ``iou_threshold`` (any score), or ``C`` when
    none does. Shapes as in :func:`coco_map`."""
    matrix = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)
    for pred, target in zip(preds, targets):
        target = target[target[:, 0] >= 0]
        if len(target) == 0:
            continue
        truth = target[:, 0].long()
        if len(pred) == 0:
            matrix.index_put_((truth, torch.full_like(truth, num_classes)), torch.ones_like(truth), accumulate=True)
            continue
        iou = box_iou(target[:, 1:].double(), pred[:, 2:].double())  # [M, K]
        scores = torch.where(iou >= iou_threshold, pred[None, :, 1].double(), -math.inf)
        best = scores.argmax(dim=1)
        column = torch.where(scores.max(dim=1).values > -math.inf, pred[best, 0].long(), num_classes)
        matrix.index_put_((truth, column), torch.ones_like(truth), accumulate=True)
    return matrix


def confusion_summary(matrix: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """``{"labels", "matrix", "confused"}`` for eval.json: ``confused`` holds the off-diagonal
    ``{"truth", "predicted", "count", "fraction"}`` (fraction of the truth class's boxes), most first."""
    labels = [*classes, "none"]
    confused = []
    for t, name in enumerate(classes):
        total = int(matrix[t].sum())
        for p, other in enumerate(classes):
            if p != t and int(matrix[t, p]):
                confused.append({"truth": name, "predicted": other, "count": int(matrix[t, p]),
                                 "fraction": int(matrix[t, p]) / total})
    confused.sort(key=lambda c: (-c["count"], c["truth"], c["predicted"]))
    return {"labels": labels, "matrix": matrix.tolist(), "confused": confused}


def flat_per_class(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"ap50/<name>", "ap/<name>"}`` for MLflow, whose metrics are flat; classes without ground
    truth are left out (their -1 is no score). Characters MLflow refuses in a metric name become ``_``."""
    return {f"{key}/{re.sub(r'[^A-Za-z0-9_.: /-]', '_', name)}": values[key]
            for name, values in per_class.items() if values["num_objects"] for key in ("ap50", "ap")}
