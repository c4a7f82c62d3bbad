"""Anchor sizes and ratios fitted to a dataset's boxes (the ``photos`` recipe), and how well anchors cover boxes.

TinySSD's anchors per feature-map pixel are every size of the scale with ``ratios[0]``, and the scale's
first size with every other ratio (``ssd.core.anchors.multibox_prior``). :func:`fit_anchors` keeps that
structure (and the count of sizes and ratios) and fits the numbers to the training boxes, measured in the
square input frame, for the feature maps the anchors sit on: it maximises the boxes' mean best IoU with
an anchor, by coordinate ascent over a log-spaced grid, one size or ratio at a time, starting from the
ratios' quantiles (median first: it goes with every size) and sizes spread over the boxes' range. A
grid that is too coarse for a thin box cannot hold it whatever the anchor's size (at 128 px the 2 x 2
map's centres are half the image apart), so the fit moves such boxes to finer maps by itself; a map's
anchors are at most :data:`MAX_STRIDES` of its pixels across, so that its features see the object.

:func:`anchor_coverage` says what share of boxes some anchor overlaps at IoU >= 0.5 (a box that none
does is matched only by the greedy step of the assignment, with a poor offset to learn).
"""
from __future__ import annotations

import math

import torch

from ssd.core.boxes import box_iou

SIZE_GRID = [round(0.02 * (1 / 0.02) ** (i / 31), 4) for i in range(32)]     # 0.02 .. 1, log-spaced
RATIO_GRID = [round(8 ** ((i - 15) / 15), 4) for i in range(31)]             # 1/8 .. 8, log-spaced
SWEEPS = 3
MAX_STRIDES = 8.0   # an anchor is at most this many of its map's pixels across: a finer map's features see too
                    # little of a larger object (at 256 px the finest map's pixel is 1/32 of the image)


def _shapes(sizes: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Anchor ``(w, h)`` per pixel of a square map, ``Tensor[..., k, 2]``, in ``multibox_prior``'s order:
    every size (``sizes Tensor[..., n]``) with ``ratios[0]``, then ``sizes[0]`` with the other ratios."""
    root = ratios.sqrt()
    w = torch.cat((sizes * root[..., :1], sizes[..., :1] * root[..., 1:]), dim=-1)
    h = torch.cat((sizes / root[..., :1], sizes[..., :1] / root[..., 1:]), dim=-1)
    return torch.stack((w, h), dim=-1)


def _centred_iou(boxes: torch.Tensor, centres: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """IoU of each box ``Tensor[N, 4]`` with anchors of ``shapes Tensor[..., k, 2]`` centred on the box's
    ``centres Tensor[N, 2]``: ``Tensor[N, ..., k]``."""
    extra = shapes.dim() - 2
    b = boxes.reshape(len(boxes), *[1] * (extra + 1), 4)
    c = centres.reshape(len(boxes), *[1] * (extra + 1), 2)
    half = shapes[None] / 2
    lo, hi = c - half, c + half
    overlap = (torch.minimum(hi, b[..., 2:]) - torch.maximum(lo, b[..., :2])).clamp(min=0).prod(-1)
    area = (b[..., 2:] - b[..., :2]).prod(-1) + shapes[None].prod(-1)
    return overlap / (area - overlap)


def _nearest_centres(boxes: torch.Tensor, feature_size: tuple[int, int]) -> torch.Tensor:
    """The anchor centre of a map of ``(H, W)`` pixels nearest each box's centre: ``Tensor[N, 2]``. A box's
    best IoU with same-shaped anchors is at that centre (IoU falls with the distance along each axis)."""
    height, width = feature_size
    size = torch.tensor([width, height], dtype=boxes.dtype)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    return (torch.minimum((centre * size).floor(), size - 1) + 0.5) / size


def fit_anchors(boxes: torch.Tensor, feature_sizes: list[tuple[int, int]], sizes_per_scale: int = 2,
                num_ratios: int = 3) -> tuple[list[list[float]], list[float]]:
    """Anchor ``sizes`` (one list of ``sizes_per_scale`` per feature map of ``feature_sizes``, each
    ``(H, W)``, square input) and ``num_ratios`` ``ratios`` fitted to corner boxes ``Tensor[N, 4]`` in [0, 1].

    Deterministic; values come from :data:`SIZE_GRID` and :data:`RATIO_GRID`. Raises ``ValueError``
    without a box of positive width and height.
    """
    boxes = boxes.double().reshape(-1, 4)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes) == 0:
        raise ValueError("cannot fit anchors: no boxes with a positive width and height")
    limits = [MAX_STRIDES / min(hw) for hw in feature_sizes]  # the largest size each map may hold
    grids = [torch.tensor([g for g in SIZE_GRID if g <= limit] or SIZE_GRID[:1], dtype=boxes.dtype)
             for limit in limits]
    sizes, ratios = _start(boxes, grids, sizes_per_scale, num_ratios)
    centres = [_nearest_centres(boxes, hw) for hw in feature_sizes]
    ratio_grid = torch.tensor(RATIO_GRID, dtype=boxes.dtype)

    def best(sizes: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
        """Mean best IoU ``Tensor[...]`` for ``sizes Tensor[..., scales, n]``, ``ratios Tensor[..., r]``."""
        per_scale = [_centred_iou(boxes, c, _shapes(sizes[..., i, :], ratios)).amax(-1) for i, c in enumerate(centres)]
        return torch.stack(per_scale).amax(0).mean(0)

    score = float(best(sizes, ratios))
    for _ in range(SWEEPS):
        before = score
        for i in range(len(feature_sizes)):
            for j in range(sizes_per_scale):
                trial = sizes.expand(len(grids[i]), -1, -1).clone()
                trial[:, i, j] = grids[i]
                score, sizes = _pick(best(trial, ratios.expand(len(grids[i]), -1)), trial, score, sizes)
        for j in range(num_ratios):
            trial = ratios.expand(len(ratio_grid), -1).clone()
            trial[:, j] = ratio_grid
            score, ratios = _pick(best(sizes.expand(len(ratio_grid), -1, -1), trial), trial, score, ratios)
        if score <= before + 1e-12:
            break
    return [[float(v) for v in row] for row in sizes], [float(r) for r in ratios]


def _start(boxes: torch.Tensor, grids: list[torch.Tensor], sizes_per_scale: int,
           num_ratios: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the ascent starts: the ratios' median and quantiles, and sizes spread evenly in log scale
    over the boxes' 5th to 95th percentile (each within its map's ``grids``)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    quantiles = torch.tensor([0.5, *[(i + 1) / num_ratios for i in range(num_ratios - 1)]], dtype=boxes.dtype)
    ratios = torch.tensor([_nearest(RATIO_GRID, float(r)) for r in torch.quantile((w / h).log(), quantiles).exp()],
                          dtype=boxes.dtype)
    lo, hi = torch.quantile((w * h).sqrt().log(), torch.tensor([0.05, 0.95], dtype=boxes.dtype)).tolist()
    count = len(grids) * sizes_per_scale
    spread = [_nearest(SIZE_GRID, math.exp(lo + (hi - lo) * i / max(1, count - 1))) for i in range(count)]
    spread = [min(v, float(grids[i // sizes_per_scale][-1])) for i, v in enumerate(spread)]
    return torch.tensor(spread, dtype=boxes.dtype).reshape(len(grids), sizes_per_scale), ratios


def _pick(scores: torch.Tensor, trials: torch.Tensor, score: float, current: torch.Tensor
          ) -> tuple[float, torch.Tensor]:
    """The best trial if it beats ``score`` (the first on ties), else the current values."""
    k = int(scores.argmax())
    return (float(scores[k]), trials[k]) if float(scores[k]) > score + 1e-12 else (score, current)


def _nearest(grid: list[float], value: float) -> float:
    return min(grid, key=lambda g: abs(math.log(g) - math.log(value)))


def anchor_coverage(anchors: torch.Tensor, boxes: torch.Tensor, iou: float = 0.5) -> float:
    """Share of corner boxes ``Tensor[N, 4]`` that some anchor of ``Tensor[1, A, 4]`` (or ``[A, 4]``)
    overlaps at IoU >= ``iou``; 1.0 without boxes."""
    boxes = boxes.reshape(-1, 4).float()
    if len(boxes) == 0:
        return 1.0
    best = box_iou(boxes, anchors.reshape(-1, 4).float()).max(dim=1).values
    return float((best >= iou).float().mean())
