"""The evaluation's pictures: precision-recall curve, confusion matrix, and a gallery of detections.

``reports/pictures/pr_curve.png``, ``confusion.png`` and ``gallery.png`` (images picked so every
class appears, ground truth in green with class names, each image's top detections with class
names and scores, those under the threshold drawn faintly). Matplotlib (Agg) is imported only here.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ssd.data.layout import GALLERY_PICTURE

TRUTH_RGB = (0.0, 0.78, 0.0)
# Prediction colours by class (tab10 without its green, which is the ground truth's).
PRED_RGB = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74), (0.55, 0.34, 0.29),
            (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and the same pictures on every machine
    import matplotlib.pyplot as plt

    return plt


def pr_curve_figure(curve: Sequence[dict[str, float]], threshold: float) -> Any:
    fig, ax = _pyplot().subplots(figsize=(5, 4), dpi=100)
    ax.plot([p["recall"] for p in curve], [p["precision"] for p in curve], marker=".", markersize=3)
    at = min(curve, key=lambda p: abs(p["threshold"] - threshold))
    ax.plot([at["recall"]], [at["precision"]], "o", color="tab:red", label=f"score >= {threshold:g}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title="Validation precision-recall (IoU >= 0.5)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def gallery_indices(labels: Sequence[torch.Tensor], num_classes: int, n: int) -> list[int]:
    """Up to ``n`` image indices, taken from each class in turn (its images in dataset order), so
    every class with a validation box appears; the rest in order. ``labels``: each image's rows
    ``Tensor[k, 5]`` (only the class column is read; class < 0 is padding), or ``Tensor[N, M, 5]``."""
    counts = torch.tensor([len(rows) for rows in labels], dtype=torch.int64)
    image = torch.repeat_interleave(torch.arange(len(labels)), counts)
    classes = torch.cat([rows[:, 0] for rows in labels]) if len(labels) else torch.empty(0)
    present = [image[classes == c].unique().tolist() for c in range(num_classes)]  # sorted
    chosen: list[int] = []
    while len(chosen) < min(n, len(labels)) and any(present):
        for images in present:
            while images and images[0] in chosen:
                images.pop(0)
            if images and len(chosen) < n:
                chosen.append(images.pop(0))
    taken = set(chosen)
    rest = [i for i in range(min(len(labels), n + len(chosen))) if i not in taken]
    return chosen + rest[:max(0, n - len(chosen))]


def top_detections(pred: torch.Tensor, num_truth: int) -> torch.Tensor:
    """The detections a gallery image shows: the best ``num_truth + 2`` (at least 3, at most 10)."""
    k = min(10, max(3, num_truth + 2))
    return pred[torch.argsort(pred[:, 1], descending=True, stable=True)][:k]


def _draw_cell(ax: Any, image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, classes: Sequence[str],
               threshold: float) -> None:
    """One gallery image with its ground truth and top detections (shapes as :func:`gallery_figure`'s)."""
    from matplotlib.patches import Rectangle

    size = image.shape[-1]
    ax.imshow(image.permute(1, 2, 0).numpy(), extent=(0, size, size, 0))
    truth = label[label[:, 0] >= 0]
    for cls, x1, y1, x2, y2 in (truth * torch.tensor([1, size, size, size, size])).tolist():
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=TRUTH_RGB, linewidth=1.5))
        ax.text(x1 + 1, y2 - 1, classes[int(cls)], color="white", fontsize=6, va="bottom",
                bbox={"facecolor": TRUTH_RGB, "alpha": 0.8, "pad": 1, "linewidth": 0})
    for cls, score, *box in (top_detections(pred, len(truth)) * torch.tensor([1, 1, size, size, size, size])).tolist():
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


def gallery_figure(images: torch.Tensor, preds: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                   classes: Sequence[str], threshold: float, names: Sequence[str] = ()) -> Any:
    """A grid (4 wide, 300 px a cell) of images ``uint8 Tensor[N, 3, S, S]`` with their ground truth
    (``labels``: each image's rows ``Tensor[k, 5]``, normalised; green, class names) and top detections
    (``preds``: ``Tensor[K, 6]`` normalised, as :func:`ssd.engine.evaluation.run_model` gives; coloured
    by class with name and score, dashed and faint under ``threshold``)."""
    n = len(images)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = _pyplot().subplots(rows, cols, figsize=(3 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        _draw_cell(axes.flat[i], images[i], preds[i], labels[i], classes, threshold)
        axes.flat[i].set_title(names[i] if i < len(names) else str(i), fontsize=8)
    fig.suptitle(f"ground truth (green); top detections, faint and dashed under score {threshold:g}", fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(summary: dict[str, Any]) -> Any:
    """The confusion matrix of :func:`ssd.engine.metrics.confusion_summary` as a small picture:
    counts, shaded by the fraction of each ground-truth class's boxes."""
    matrix = torch.tensor(summary["matrix"], dtype=torch.float64)
    labels = summary["labels"]
    fraction = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    side = 1.5 + 0.6 * len(labels)
    fig, ax = _pyplot().subplots(figsize=(side, side * 0.85), dpi=100)
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


@contextmanager
def report_figures(dataset: Any, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                   confusion: dict[str, Any], curve: Sequence[dict[str, float]], threshold: float,
                   gallery_images: int) -> Iterator[dict[str, Any]]:
    """The evaluate stage's pictures, by file name, closed on exit.

    ``dataset``: the validation split (either dataset of ``ssd.data.dataset``: only the gallery's
    images are read from it); ``preds``: its detections per image, normalised; ``targets``: each
    image's label rows (any scale: only classes are read); ``confusion``:
    :func:`ssd.engine.metrics.confusion_summary`'s; ``curve``: :func:`ssd.engine.metrics.precision_recall`'s;
    ``gallery_images``: how many images the gallery shows.
    """
    shown = gallery_indices(targets, len(dataset.classes), gallery_images)
    items = [dataset[i] for i in shown]
    images = torch.stack([image for image, _ in items]) if items else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    figures = {"pr_curve.png": pr_curve_figure(curve, threshold),
               "confusion.png": confusion_figure(confusion),
               GALLERY_PICTURE: gallery_figure(images, [preds[i] for i in shown], [rows for _, rows in items],
                                             dataset.classes, threshold, [dataset.names[i] for i in shown])}
    try:
        yield figures
    finally:
        for fig in figures.values():
            _pyplot().close(fig)
