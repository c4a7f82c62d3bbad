"""Evaluate the trained model on the validation split.

    ssd evaluate [--model models/model.pt] [--data data/raw/banana-detection] [--reports reports]

Metrics (``reports/eval.json``, DVC metrics):

- ``map_50``, ``map``: COCO mAP@0.5 and mAP@[.5:.95] from torchmetrics' ``MeanAveragePrecision``
  (pycocotools backend; at most 100 detections per image, as COCO);
- ``precision``, ``recall``: at the seed's display threshold (``evaluate.threshold``); a detection
  is a true positive if its IoU with a not yet matched ground-truth box of its class is >= 0.5
  (detections taken in decreasing score);
- ``per_class``: for each class name ``{"ap50", "ap", "num_objects"}``, COCO's AP@0.5 and
  AP@[.5:.95] of that class alone (-1 for a class with no validation object, COCO's convention);
  ``dvc metrics show`` lists them as ``per_class.<name>.ap50``, MLflow as ``val_ap50/<name>``;
- ``confusion``: which classes are taken for which: ``matrix[t][p]`` counts the ground-truth boxes
  of class ``t`` whose top-scoring detection at IoU >= 0.5 (any score) has class ``p``; the last
  column (``none``) those with no detection there; ``confused`` lists the off-diagonal pairs, most
  frequent first (lists, so ``dvc metrics show`` leaves them out);
- ``class_err``, ``bbox_mae``: the seed's training metrics on the validation split;
- ``provenance``: git commit and data hash/source (``ssd.mlops.tracking.provenance``), the training run's
  tags (computed now only for a model without a run).

Pictures: ``reports/pr_curve.csv`` (DVC plot of precision against recall over score thresholds),
``reports/pictures/pr_curve.png``, ``reports/pictures/confusion.png`` and
``reports/pictures/gallery.png`` (images picked so every class appears, ground truth in green with
class names, each image's top detections with class names and scores, those under the threshold
drawn faintly). ``evaluate.nms`` picks class-agnostic (the book's) or per-class NMS. Everything
is also logged into the training's MLflow run (``models/mlflow_run.json``); without that file the
reports are still written and MLflow logging is skipped with a warning, so the stage can be run on a
model that came from elsewhere.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ssd.core.anchors import multibox_target
from ssd.core.boxes import box_iou
from ssd.util.files import atomic_dir, atomic_save_figure, atomic_write_json, atomic_write_text
from ssd.core.loss import bbox_eval, cls_eval
from ssd.core.model import as_input
from ssd.engine.inference import decode_outputs

MATCH_IOU = 0.5
MAX_DETECTIONS = 100  # COCO's largest maxDets: more would not change mAP
CURVE_THRESHOLDS = [i / 100 for i in range(101)]


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
    import re

    return {f"{key}/{re.sub(r'[^A-Za-z0-9_.: /-]', '_', name)}": values[key]
            for name, values in per_class.items() if values["num_objects"] for key in ("ap50", "ap")}


@torch.inference_mode()
def run_model(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, nms_threshold: float,
              batch_size: int = 32, per_class: bool = False) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Detections (normalised, ``Tensor[K, 6]`` per image) and the seed's ``class_err``/``bbox_mae``.

    ``images uint8 Tensor[N, 3, S, S]``, ``labels Tensor[N, M, 5]``.
    """
    device = next(net.parameters()).device
    preds: list[torch.Tensor] = []
    correct = anchors_seen = abs_err = offsets_seen = 0.0
    for start in range(0, len(images), batch_size):
        X, Y = images[start:start + batch_size], labels[start:start + batch_size].to(device)
        anchors, cls_preds, bbox_preds = net(as_input(X, device))
        bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, Y)
        correct += float(cls_eval(cls_preds, cls_labels))
        anchors_seen += cls_labels.numel()
        abs_err += float(bbox_eval(bbox_preds, bbox_labels, bbox_masks))
        offsets_seen += bbox_labels.numel()
        preds += decode_outputs(anchors, cls_preds, bbox_preds, nms_threshold, MAX_DETECTIONS, per_class=per_class)
    return preds, {"class_err": 1 - correct / max(anchors_seen, 1), "bbox_mae": abs_err / max(offsets_seen, 1)}


def pr_curve_figure(curve: Sequence[dict[str, float]], threshold: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot([p["recall"] for p in curve], [p["precision"] for p in curve], marker=".", markersize=3)
    at = min(curve, key=lambda p: abs(p["threshold"] - threshold))
    ax.plot([at["recall"]], [at["precision"]], "o", color="tab:red", label=f"score >= {threshold:g}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title="Validation precision-recall (IoU >= 0.5)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def gallery_indices(labels: torch.Tensor, num_classes: int, n: int) -> list[int]:
    """Up to ``n`` image indices, taken from each class in turn (its images in dataset order), so
    every class with a validation box appears; the rest in order. ``labels Tensor[N, M, 5]``."""
    present = [torch.nonzero((labels[..., 0] == c).any(dim=1)).reshape(-1).tolist() for c in range(num_classes)]
    chosen: list[int] = []
    while len(chosen) < min(n, len(labels)) and any(present):
        for images in present:
            while images and images[0] in chosen:
                images.pop(0)
            if images and len(chosen) < n:
                chosen.append(images.pop(0))
    rest = [i for i in range(len(labels)) if i not in chosen]
    return chosen + rest[:max(0, n - len(chosen))]


TRUTH_RGB = (0.0, 0.78, 0.0)
# Prediction colours by class (tab10 without its green, which is the ground truth's).
PRED_RGB = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74), (0.55, 0.34, 0.29),
            (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81)]


def top_detections(pred: torch.Tensor, num_truth: int) -> torch.Tensor:
    """The detections a gallery image shows: the best ``num_truth + 2`` (at least 3, at most 10)."""
    k = min(10, max(3, num_truth + 2))
    return pred[torch.argsort(pred[:, 1], descending=True, stable=True)][:k]


def gallery_figure(images: torch.Tensor, preds: Sequence[torch.Tensor], labels: torch.Tensor,
                   classes: Sequence[str], threshold: float, names: Sequence[str] = ()) -> Any:
    """A grid (4 wide, 300 px a cell) of images ``uint8 Tensor[N, 3, S, S]`` with their ground truth
    (``labels Tensor[N, M, 5]``, green, class names) and top detections (``preds``: ``Tensor[K, 6]``
    normalised, as :func:`run_model` gives; coloured by class with name and score, dashed and faint
    under ``threshold``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        size = images.shape[-1]
        ax = axes.flat[i]
        ax.imshow(images[i].permute(1, 2, 0).numpy(), extent=(0, size, size, 0))
        truth = labels[i][labels[i][:, 0] >= 0]
        for cls, *box in (truth * torch.tensor([1, size, size, size, size])).tolist():
            x1, y1, x2, y2 = box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=TRUTH_RGB, linewidth=1.5))
            ax.text(x1 + 1, y2 - 1, classes[int(cls)], color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": TRUTH_RGB, "alpha": 0.8, "pad": 1, "linewidth": 0})
        for cls, score, *box in (top_detections(preds[i], len(truth)) * torch.tensor(
                [1, 1, size, size, size, size])).tolist():
            x1, y1, x2, y2 = (min(max(v, 0.0), size) for v in box)
            shown = score >= threshold
            color = PRED_RGB[int(cls) % len(PRED_RGB)]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                                   linewidth=1.5 if shown else 1.0, linestyle="-" if shown else "--",
                                   alpha=1.0 if shown else 0.45))
            ax.text(x1 + 1, y1 + 1, f"{classes[int(cls)]} {score:.2f}", color="white", fontsize=6, va="top",
                    alpha=1.0 if shown else 0.6,
                    bbox={"facecolor": color, "alpha": 0.8 if shown else 0.3, "pad": 1, "linewidth": 0})
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
        ax.set_title(names[i] if i < len(names) else str(i), fontsize=8)
    fig.suptitle(f"ground truth (green); top detections, faint and dashed under score {threshold:g}", fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(summary: dict[str, Any]) -> Any:
    """The confusion matrix of :func:`confusion_summary` as a small picture: counts, shaded by
    the fraction of each ground-truth class's boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(summary["matrix"], dtype=torch.float64)
    labels = summary["labels"]
    fraction = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    side = 1.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
    ax.imshow(fraction.numpy(), cmap="Blues", vmin=0, vmax=1)
    for t, row in enumerate(matrix.tolist()):
        for p, count in enumerate(row):
            ax.text(p, t, f"{int(count)}", ha="center", va="center", fontsize=8,
                    color="white" if fraction[t, p] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels) - 1), labels[:-1], fontsize=8)
    ax.set(xlabel="top detection at IoU >= 0.5", ylabel="ground truth", title="What each box is taken for")
    fig.tight_layout()
    return fig


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
    """A model's results on a validation split: the stage's ``metrics``, and the detections per
    image normalised (``preds``) and in pixels with the pixel ground truth (for the curve)."""
    metrics: dict[str, Any]
    preds: list[torch.Tensor]
    pixel_preds: list[torch.Tensor]
    pixel_targets: list[torch.Tensor]


def load_validation(params: dict[str, Any], data_root: str | Path) -> Any:
    """The validation split of ``data_root`` as the evaluate stage reads it (``DetectionDataset``)."""
    from ssd.data.dataset import load_dataset

    data_cfg = params["data"]
    dataset = load_dataset(data_root, "val", data_cfg["image_size"], data_cfg["classes"],
                           data_cfg["max_image_pixels"])
    if len(dataset) == 0:
        raise ValueError(f"{dataset.split_dir}: the validation split is empty")
    return dataset


def score(net: torch.nn.Module, dataset: Any, params: dict[str, Any]) -> Scores:
    """Run ``net`` over ``dataset`` (on the GPU when there is one) and compute the stage's metrics.

    The one scoring path: the evaluate stage uses it for the trained model, and the registry for a
    champion re-scored on the current validation split.
    """
    cfg = params["evaluate"]
    threshold, nms_threshold = float(cfg["threshold"]), float(cfg["nms_threshold"])
    per_class = cfg["nms"] == "per_class"  # the schema allows agnostic | per_class
    net = net.to("cuda" if torch.cuda.is_available() else "cpu")
    preds, seed_metrics = run_model(net, dataset.images, dataset.labels, nms_threshold, per_class=per_class)

    # Pixel boxes: IoU is the same, and COCO's small/medium/large areas mean something.
    size = dataset.images.shape[-1]
    pixel_preds = [p * torch.tensor([1, 1, size, size, size, size]) for p in preds]
    pixel_targets = [t * torch.tensor([1, size, size, size, size]) for t in dataset.labels]
    metrics: dict[str, Any] = {**detection_metrics(pixel_preds, pixel_targets, threshold), **seed_metrics,
                               "threshold": threshold, "num_images": len(dataset),
                               "num_objects": int((dataset.labels[..., 0] >= 0).sum()),
                               "per_class": per_class_ap(pixel_preds, pixel_targets, dataset.classes),
                               "confusion": confusion_summary(
                                   confusion_matrix(pixel_preds, pixel_targets, len(dataset.classes)),
                                   dataset.classes)}
    return Scores(metrics, preds, pixel_preds, pixel_targets)


def evaluate(params: dict[str, Any], model_path: str | Path, data_root: str | Path, reports: str | Path,
             run_file: str | Path) -> dict[str, Any]:
    """The whole stage: metrics, curve and pictures written under ``reports``, logged to MLflow."""
    from ssd.core.model import load_model
    from ssd.mlops.tracking import log_evaluation, provenance, run_provenance, training_run

    run = training_run(run_file)  # first: an unreachable server fails the stage before any scoring
    # The model's provenance is its training run's (the same tags as on the run and the version);
    # only a model that came from elsewhere, with no run, gets the checkout's and data's.
    origin = run_provenance(run.tags) if run else provenance(data_root)
    cfg = params["evaluate"]
    threshold = float(cfg["threshold"])
    net = load_model(model_path)
    dataset = load_validation(params, data_root)
    scores = score(net, dataset, params)
    metrics, preds = scores.metrics, scores.preds
    curve = precision_recall(scores.pixel_preds, scores.pixel_targets, CURVE_THRESHOLDS)

    shown = gallery_indices(dataset.labels, len(dataset.classes), int(cfg["gallery_images"]))
    import matplotlib.pyplot as plt

    figures = {"pr_curve.png": pr_curve_figure(curve, threshold),
               "confusion.png": confusion_figure(metrics["confusion"]),
               "gallery.png": gallery_figure(dataset.images[shown], [preds[i] for i in shown], dataset.labels[shown],
                                             dataset.classes, threshold, [dataset.names[i] for i in shown])}
    try:
        paths = write_reports(Path(reports), {**metrics, "provenance": origin}, curve, figures)
    finally:
        for fig in figures.values():
            plt.close(fig)
    if run:
        log_evaluation(run, {**metrics, **flat_per_class(metrics["per_class"])}, paths)
    return metrics
