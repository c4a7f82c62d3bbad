"""The seed's loss and training metrics.

The loss is cross entropy over anchor classes plus L1 over the offsets of anchors that hold an
object. The metric helpers return 0-dim tensors instead of the book's Python floats, so a training
loop can add them up on the device and read them once per epoch (no host sync per step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def calc_loss(cls_preds: torch.Tensor, cls_labels: torch.Tensor, bbox_preds: torch.Tensor,
              bbox_labels: torch.Tensor, bbox_masks: torch.Tensor) -> torch.Tensor:
    """Per-example loss ``Tensor[B]``.

    Args:
        cls_preds: ``Tensor[B, A, C + 1]`` logits; cls_labels: ``Tensor[B, A]`` int64.
        bbox_preds, bbox_labels, bbox_masks: ``Tensor[B, A * 4]``.
    """
    batch_size, num_classes = cls_preds.shape[0], cls_preds.shape[2]
    cls = F.cross_entropy(cls_preds.reshape(-1, num_classes).float(), cls_labels.reshape(-1),
                          reduction="none").reshape(batch_size, -1).mean(dim=1)
    bbox = F.l1_loss(bbox_preds.float() * bbox_masks, bbox_labels * bbox_masks, reduction="none").mean(dim=1)
    return cls + bbox


def cls_eval(cls_preds: torch.Tensor, cls_labels: torch.Tensor) -> torch.Tensor:
    """Number of anchors whose predicted class is right (0-dim tensor)."""
    return (cls_preds.argmax(dim=-1).type(cls_labels.dtype) == cls_labels).sum()


def bbox_eval(bbox_preds: torch.Tensor, bbox_labels: torch.Tensor, bbox_masks: torch.Tensor) -> torch.Tensor:
    """Sum of absolute offset errors over anchors that hold an object (0-dim tensor)."""
    return torch.abs((bbox_labels - bbox_preds.float()) * bbox_masks).sum()
