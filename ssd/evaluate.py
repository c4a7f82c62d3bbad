"""Evaluate the trained model on the validation split.

    ssd evaluate [--model models/model.pt] [--data data/raw/banana-detection] [--reports reports]

Metrics (``reports/eval.json``, DVC metrics):

- ``map_50``, ``map``: COCO mAP@0.5 and mAP@[.5:.95] from torchmetrics' ``MeanAveragePrecision``
  (pycocotools backend; at most 100 detections per image, as COCO);
- ``precision``, ``recall``: at the seed's display threshold (``evaluate.threshold``); a detection
  is a true positive if its IoU with a not yet matched ground-truth box of its class is >= 0.5
  (detections taken in decreasing score);
- ``class_err``, ``bbox_mae``: the seed's training metrics on the validation split;
- ``provenance``: git commit and data hash/source (``ssd.tracking.provenance``), the training run's
  tags (computed now only for a model without a run).

Pictures: ``reports/pr_curve.csv`` (DVC plot of precision against recall over score thresholds),
``reports/pictures/pr_curve.png`` and ``reports/pictures/gallery.png`` (predictions above the
threshold in white, ground truth in green). Everything is also logged into the training's MLflow
run (``models/mlflow_run.json``); without that file the reports are still written and MLflow
logging is skipped with a warning, so the stage can be run on a model that came from elsewhere.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .anchors import multibox_target
from .boxes import box_iou
from .files import atomic_dir, atomic_save_figure, atomic_write_json, atomic_write_text
from .layout import DATASET_DIR
from .loss import bbox_eval, cls_eval
from .predict import decode_outputs, draw_detections, to_pixels

PARAMS = ("evaluate", "data.classes", "data.image_size", "data.max_image_pixels")  # what the stage reads (dvc.yaml lists them)
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


@torch.inference_mode()
def run_model(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, nms_threshold: float,
              batch_size: int = 32) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Detections (normalised, ``Tensor[K, 6]`` per image) and the seed's ``class_err``/``bbox_mae``.

    ``images uint8 Tensor[N, 3, S, S]``, ``labels Tensor[N, M, 5]``.
    """
    device = next(net.parameters()).device
    preds: list[torch.Tensor] = []
    correct = anchors_seen = abs_err = offsets_seen = 0.0
    for start in range(0, len(images), batch_size):
        X, Y = images[start:start + batch_size], labels[start:start + batch_size].to(device)
        anchors, cls_preds, bbox_preds = net(X.to(device).float())
        bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, Y)
        correct += float(cls_eval(cls_preds, cls_labels))
        anchors_seen += cls_labels.numel()
        abs_err += float(bbox_eval(bbox_preds, bbox_labels, bbox_masks))
        offsets_seen += bbox_labels.numel()
        preds += decode_outputs(anchors, cls_preds, bbox_preds, nms_threshold, MAX_DETECTIONS)
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


def gallery_figure(images: torch.Tensor, preds: Sequence[torch.Tensor], labels: torch.Tensor,
                   classes: Sequence[str], threshold: float, names: Sequence[str] = ()) -> Any:
    """A grid of validation images with predictions (score >= threshold) and ground truth drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(images)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        size = images.shape[-1]
        picture = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        truth = labels[i][labels[i][:, 0] >= 0][:, 1:] * size
        shown = draw_detections(picture, to_pixels(preds[i], (size, size), classes, threshold), truth.tolist())
        ax = axes.flat[i]
        ax.imshow(shown)
        ax.set_title(names[i] if i < len(names) else str(i), fontsize=8)
    fig.suptitle(f"predictions with score >= {threshold:g} (white), ground truth (green)", fontsize=10)
    fig.tight_layout()
    return fig


def write_reports(reports: Path, metrics: dict[str, Any], curve: Sequence[dict[str, float]],
                  pr_fig: Any, gallery_fig: Any) -> dict[str, Path]:
    """Write every evaluation output atomically; returns their paths."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["threshold", "recall", "precision"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve)
    paths = {"metrics": reports / "eval.json", "pr_curve": reports / "pr_curve.csv",
             "pictures": reports / "pictures"}
    with atomic_dir(paths["pictures"]) as tmp:
        atomic_save_figure(pr_fig, tmp / "pr_curve.png")
        atomic_save_figure(gallery_fig, tmp / "gallery.png")
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
    from .data import load_dataset

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
    net = net.to("cuda" if torch.cuda.is_available() else "cpu")
    preds, seed_metrics = run_model(net, dataset.images, dataset.labels, nms_threshold)

    # Pixel boxes: IoU is the same, and COCO's small/medium/large areas mean something.
    size = dataset.images.shape[-1]
    pixel_preds = [p * torch.tensor([1, 1, size, size, size, size]) for p in preds]
    pixel_targets = [t * torch.tensor([1, size, size, size, size]) for t in dataset.labels]
    metrics: dict[str, Any] = {**detection_metrics(pixel_preds, pixel_targets, threshold), **seed_metrics,
                               "threshold": threshold, "num_images": len(dataset),
                               "num_objects": int((dataset.labels[..., 0] >= 0).sum())}
    return Scores(metrics, preds, pixel_preds, pixel_targets)


def evaluate(params: dict[str, Any], model_path: str | Path, data_root: str | Path, reports: str | Path,
             run_file: str | Path) -> dict[str, Any]:
    """The whole stage: metrics, curve and pictures written under ``reports``, logged to MLflow."""
    from .model import load_model
    from .tracking import log_evaluation, provenance, run_provenance, training_run

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

    n = min(int(cfg["gallery_images"]), len(dataset))
    import matplotlib.pyplot as plt

    pr_fig = pr_curve_figure(curve, threshold)
    gallery_fig = gallery_figure(dataset.images[:n], preds[:n], dataset.labels[:n], net.config.classes,
                                 threshold, dataset.names[:n])
    try:
        paths = write_reports(Path(reports), {**metrics, "provenance": origin}, curve, pr_fig,
                              gallery_fig)
    finally:
        plt.close(pr_fig)
        plt.close(gallery_fig)
    if run:
        log_evaluation(run, metrics, paths)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_params_arguments

    parser.add_argument("--model", default="models/model.pt", help="model file (default: %(default)s)")
    parser.add_argument("--data", default=f"data/raw/{DATASET_DIR}", help="dataset root (default: %(default)s)")
    parser.add_argument("--reports", default="reports", help="reports folder (default: %(default)s)")
    parser.add_argument("--run-file", default="models/mlflow_run.json",
                        help="the training's MLflow run (default: %(default)s)")
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from .params import load_params, select_params

    params = select_params(load_params(args.params, args.set), PARAMS)
    metrics = evaluate(params, args.model, args.data, args.reports, args.run_file)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())))
    return 0
