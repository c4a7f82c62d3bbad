"""Bounding-box helpers.

Boxes are normalised to [0, 1] throughout the package. Two formats are used:
corner ``(x1, y1, x2, y2)`` with ``0 <= x1 < x2`` and ``0 <= y1 < y2``, and
center ``(cx, cy, w, h)``. All functions are pure and keep the input's device and dtype.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou

__all__ = ["box_corner_to_center", "box_center_to_corner", "box_iou", "check_boxes"]


def box_corner_to_center(boxes: torch.Tensor) -> torch.Tensor:
    """Corner boxes ``Tensor[..., 4]`` to center boxes ``Tensor[..., 4]``."""
    return box_convert(boxes, "xyxy", "cxcywh")


def box_center_to_corner(boxes: torch.Tensor) -> torch.Tensor:
    """Center boxes ``Tensor[..., 4]`` to corner boxes ``Tensor[..., 4]``."""
    return box_convert(boxes, "cxcywh", "xyxy")


def check_boxes(boxes: torch.Tensor, what: str = "boxes") -> None:
    """Raise ``ValueError`` if any corner box ``Tensor[N, 4]`` is non-finite or inverted.

    Empty or zero-area boxes are refused too: they have no IoU with anything and would
    silently become background.
    """
    if boxes.numel() == 0:
        return
    finite = torch.isfinite(boxes).all(dim=-1)
    ordered = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    bad = ~(finite & ordered)
    if bool(bad.any()):
        idx = int(torch.nonzero(bad.reshape(-1))[0])
        box = boxes.reshape(-1, 4)[idx].tolist()
        reason = "is not finite" if not bool(finite.reshape(-1)[idx]) else "is inverted or empty (need x1 < x2, y1 < y2)"
        raise ValueError(f"{what}: box #{idx} {box} {reason}")


# `box_iou` is torchvision's: Tensor[N, 4], Tensor[M, 4] (corner format) -> Tensor[N, M].
# Its arithmetic is the same as the book's, so results agree bit for bit.
