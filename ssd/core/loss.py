"""The training losses (the seed's and the ``photos`` recipe's) and the training metrics.

:func:`calc_loss` is the seed's: cross entropy averaged over every anchor plus L1 averaged over every
anchor's offset slots (zero for background), so a few positive anchors among thousands carry little
weight. :func:`detection_loss` is the SSD paper's form of it: the class error of the positive anchors
and of the hard negatives (``hard_negative_ce``, 3 negatives per positive) or of all anchors under focal
modulation (``focal_ce``), plus a box error on the positive anchors only (GIoU of the decoded boxes,
smooth L1 of the offsets), all divided by the number of positive anchors. The metric helpers return
0-dim tensors instead of the book's Python floats, so a training loop can add them up on the device and
read them once per epoch (no host sync per step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from ssd.core.anchors import offset_inverse


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


def hard_negative_ce(cls_preds: torch.Tensor, cls_labels: torch.Tensor, neg_ratio: float = 3.0) -> torch.Tensor:
    """Summed cross entropy per image ``Tensor[B]`` over its positive anchors and its
    ``neg_ratio`` x positives background anchors of highest loss (the SSD paper's hard negatives).
    Shapes as :func:`calc_loss`; an image without positives contributes 0."""
    ce = F.cross_entropy(cls_preds.float().transpose(1, 2), cls_labels, reduction="none")  # [B, A]
    positive = cls_labels > 0
    num_neg = (positive.sum(dim=1, keepdim=True) * neg_ratio).clamp(max=cls_labels.shape[1]).long()
    # Rank the negatives by their loss (positives pushed last); the top num_neg of each row are mined.
    neg_loss = ce.detach().masked_fill(positive, -1.0)
    rank = neg_loss.argsort(dim=1, descending=True).argsort(dim=1)
    mined = ~positive & (rank < num_neg)
    return (ce * (positive | mined)).sum(dim=1)


def focal_ce(cls_preds: torch.Tensor, cls_labels: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Summed softmax focal loss per image ``Tensor[B]`` over every anchor: cross entropy times
    ``(1 - p_true) ** gamma``, weighted ``alpha`` for objects and ``1 - alpha`` for background
    (Lin et al., "Focal Loss for Dense Object Detection"). Shapes as :func:`calc_loss`."""
    log_p = F.log_softmax(cls_preds.float(), dim=-1).gather(-1, cls_labels[..., None]).squeeze(-1)
    weight = torch.where(cls_labels > 0, alpha, 1.0 - alpha)
    return (-weight * (1 - log_p.exp()).pow(gamma) * log_p).sum(dim=1)


def positive_box_loss(anchors: torch.Tensor, bbox_preds: torch.Tensor, bbox_labels: torch.Tensor,
                      bbox_masks: torch.Tensor, giou_weight: float = 2.0, l1_weight: float = 1.0) -> torch.Tensor:
    """Summed box error per image ``Tensor[B]`` over its positive anchors: ``giou_weight`` x GIoU loss
    of the decoded boxes plus ``l1_weight`` x smooth L1 (beta 1) of the four offsets.

    ``anchors Tensor[1, A, 4]``; the other shapes as :func:`calc_loss`.
    """
    batch_size = bbox_preds.shape[0]
    preds, targets = bbox_preds.float().reshape(batch_size, -1, 4), bbox_labels.reshape(batch_size, -1, 4)
    positive = bbox_masks.reshape(batch_size, -1, 4)[..., 0] > 0
    l1 = F.smooth_l1_loss(preds, targets, reduction="none", beta=1.0).sum(-1)
    loss = l1_weight * l1
    if giou_weight:
        anchors = anchors.reshape(1, -1, 4).expand(batch_size, -1, -1)
        image, anchor = torch.nonzero(positive, as_tuple=True)
        pred_boxes = offset_inverse(anchors[image, anchor], preds[image, anchor])
        true_boxes = offset_inverse(anchors[image, anchor], targets[image, anchor])
        giou = generalized_box_iou_loss(pred_boxes, true_boxes, reduction="none")
        loss = loss.index_put((image, anchor), giou_weight * giou, accumulate=True)
    return (loss * positive).sum(dim=1)


def detection_loss(anchors: torch.Tensor, cls_preds: torch.Tensor, cls_labels: torch.Tensor, bbox_preds: torch.Tensor,
                   bbox_labels: torch.Tensor, bbox_masks: torch.Tensor, *, cls: str = "hard_negatives",
                   giou_weight: float = 2.0, l1_weight: float = 1.0) -> torch.Tensor:
    """Per-example loss ``Tensor[B]`` whose mean is the batch's class error (``cls``:
    ``hard_negatives`` or ``focal``) plus box error (:func:`positive_box_loss`), divided by the
    batch's number of positive anchors (at least 1). Shapes as :func:`positive_box_loss`."""
    class_error = hard_negative_ce(cls_preds, cls_labels) if cls == "hard_negatives" else focal_ce(cls_preds, cls_labels)
    box_error = positive_box_loss(anchors, bbox_preds, bbox_labels, bbox_masks, giou_weight, l1_weight)
    num_pos = (cls_labels > 0).sum().clamp(min=1)
    return (class_error + box_error) * (cls_labels.shape[0] / num_pos)


def cls_eval(cls_preds: torch.Tensor, cls_labels: torch.Tensor) -> torch.Tensor:
    """Number of anchors whose predicted class is right (0-dim tensor)."""
    return (cls_preds.argmax(dim=-1).type(cls_labels.dtype) == cls_labels).sum()


def bbox_eval(bbox_preds: torch.Tensor, bbox_labels: torch.Tensor, bbox_masks: torch.Tensor) -> torch.Tensor:
    """Sum of absolute offset errors over anchors that hold an object (0-dim tensor)."""
    return torch.abs((bbox_labels - bbox_preds.float()) * bbox_masks).sum()
