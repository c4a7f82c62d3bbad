"""Anchor boxes: generation, labeling with offsets, and detection output.

The names and signatures are the book's (d2l, "Anchor Boxes" and "Single Shot Multibox
Detection"), so readers of the chapter find them; the bodies are batched. Boxes are corner
``(x1, y1, x2, y2)`` normalised to [0, 1]. Label rows are ``(class, x1, y1, x2, y2)``;
a row whose class is negative is padding, so images with different numbers of objects
batch together. :func:`decode_outputs` (not the book's) is the one path from the net's outputs to
detections, for prediction and evaluation alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, nms

from ssd.core.boxes import box_center_to_corner, box_corner_to_center, box_iou, check_boxes

__all__ = [
    "multibox_prior",
    "assign_anchor_to_bbox",
    "offset_boxes",
    "offset_inverse",
    "multibox_target",
    "nms",
    "multibox_detection",
    "decode_outputs",
]


def multibox_prior(data: torch.Tensor, sizes: list[float], ratios: list[float]) -> torch.Tensor:
    """Anchor boxes centred on every pixel of a feature map.

    Args:
        data: ``Tensor[..., H, W]``; only its last two sizes and its device are used.
        sizes: anchor sizes (fractions of the image side), ratios: width/height ratios.
            Each pixel gets ``len(sizes) + len(ratios) - 1`` anchors: every size with
            ``ratios[0]`` and ``sizes[0]`` with every other ratio.

    Returns:
        ``Tensor[1, H * W * (len(sizes) + len(ratios) - 1), 4]`` float32, pixel-major.
    """
    in_height, in_width = data.shape[-2:]
    device = data.device
    boxes_per_pixel = len(sizes) + len(ratios) - 1
    size_tensor = torch.tensor(sizes, device=device, dtype=torch.float32)
    ratio_tensor = torch.tensor(ratios, device=device, dtype=torch.float32)
    # Centres sit in the middle of each pixel.
    center_h = (torch.arange(in_height, device=device) + 0.5) * (1.0 / in_height)
    center_w = (torch.arange(in_width, device=device) + 0.5) * (1.0 / in_width)
    shift_y, shift_x = torch.meshgrid(center_h, center_w, indexing="ij")
    shift_y, shift_x = shift_y.reshape(-1), shift_x.reshape(-1)
    # The `in_height / in_width` factor keeps anchors square (ratio 1) on non-square maps;
    # the operation order follows the book's so results agree bit for bit.
    w = torch.cat((size_tensor * torch.sqrt(ratio_tensor[0]),
                   sizes[0] * torch.sqrt(ratio_tensor[1:]))) * in_height / in_width
    h = torch.cat((size_tensor / torch.sqrt(ratio_tensor[0]),
                   sizes[0] / torch.sqrt(ratio_tensor[1:])))
    half_extent = torch.stack((-w, -h, w, h)).T.repeat(in_height * in_width, 1) / 2
    centers = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1)
    return (centers.repeat_interleave(boxes_per_pixel, dim=0) + half_extent).unsqueeze(0)


def _assign_batched(ground_truth: torch.Tensor, valid: torch.Tensor, anchors: torch.Tensor,
                    iou_threshold: float) -> torch.Tensor:
    """Book's anchor assignment for a batch.

    Args:
        ground_truth: ``Tensor[B, M, 4]``; valid: ``Tensor[B, M]`` bool (False = padding);
        anchors: ``Tensor[A, 4]``.

    Returns:
        ``Tensor[B, A]`` int64: the index of the box assigned to each anchor, -1 for none.
    """
    batch_size, num_boxes = valid.shape
    num_anchors = anchors.shape[0]
    device = anchors.device
    anchors_bbox_map = torch.full((batch_size, num_anchors), -1, dtype=torch.long, device=device)
    if num_boxes == 0:
        return anchors_bbox_map
    # [B*M, A] -> [B, M, A]: one row of IoUs per box. Padding rows get -1, the value the greedy
    # step gives discarded pairs, so they are never picked while a real box is left.
    jaccard = box_iou(ground_truth.reshape(-1, 4).to(anchors.dtype), anchors)
    jaccard = jaccard.view(batch_size, num_boxes, num_anchors).masked_fill(~valid[..., None], -1.0)

    # 1. Every anchor takes its best box if that IoU reaches the threshold (the first box on ties).
    max_ious, indices = torch.max(jaccard, dim=1)
    anchors_bbox_map = torch.where(max_ious >= iou_threshold, indices, anchors_bbox_map)
    # 2. Greedily, each box takes the anchor it overlaps most.
    return _greedy_assign(jaccard, valid, anchors_bbox_map)


def _greedy_assign(jaccard: torch.Tensor, valid: torch.Tensor, anchors_bbox_map: torch.Tensor) -> torch.Tensor:
    """Step 2 of the book's assignment on ``jaccard Tensor[B, M, A]``: each box takes an anchor.

    Greedily, each box takes the anchor it overlaps most: the largest IoU left in the [anchor, box]
    matrix, first in row-major order on ties; then that anchor's row and that box's column are
    discarded. A box is taken after at most M - 1 anchors were discarded, so it takes one of its M
    best anchors (by IoU, then lowest index): the greedy runs on just those candidate rows, sorted
    by anchor index so row-major order is the book's. Updates and returns ``anchors_bbox_map``.
    """
    batch_size, num_boxes, num_anchors = jaccard.shape
    device = jaccard.device
    candidates = _best_anchors(jaccard, min(num_boxes, num_anchors)).reshape(batch_size, -1)
    candidates = candidates.sort(dim=1).values
    sub = jaccard.gather(2, candidates[:, None, :].expand(-1, num_boxes, -1)).transpose(1, 2).contiguous()
    flat = sub.view(batch_size, -1)
    num_real = valid.sum(dim=1)
    rows = torch.arange(batch_size, device=device)
    # Assigned through index tensors, a Python scalar would be copied from the host each time (a
    # sync on a GPU); a 0-dim tensor already on the device is not.
    discarded = torch.full((), -1.0, dtype=sub.dtype, device=device)
    for step in range(num_boxes):
        max_idx = flat.argmax(dim=1)
        box_idx = max_idx % num_boxes
        anc_idx = candidates[rows, torch.div(max_idx, num_boxes, rounding_mode="floor")]
        # Images with fewer boxes are done early: `active` masks them instead of a branch.
        active = step < num_real
        current = anchors_bbox_map[rows, anc_idx]
        anchors_bbox_map[rows, anc_idx] = torch.where(active, box_idx, current)
        sub[rows, :, box_idx] = discarded
        # An anchor can be a candidate of several boxes: discard every copy of its row.
        sub.masked_fill_((candidates == anc_idx[:, None])[..., None], -1.0)
    return anchors_bbox_map


def _best_anchors(jaccard: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``Tensor[B, M, k]`` of each box's k best anchors in ``jaccard Tensor[B, M, A]``,
    by IoU and then by lowest anchor index on ties (exactly, unlike a plain ``topk``)."""
    index = torch.arange(jaccard.shape[-1], device=jaccard.device)
    if jaccard.dtype == torch.float32 and jaccard.shape[-1] < 2**31:
        # IEEE bit patterns of non-negative floats order like the floats (and -1 sorts below them),
        # so one int64 key holds the IoU in its high half and the reversed index in its low half.
        key = (jaccard.view(torch.int32).to(torch.int64) << 32) | (2**31 - 1 - index)
        return key.topk(k, dim=-1).indices
    return torch.sort(jaccard, dim=-1, descending=True, stable=True).indices[..., :k]


def assign_anchor_to_bbox(ground_truth: torch.Tensor, anchors: torch.Tensor, device: torch.device,
                          iou_threshold: float = 0.5) -> torch.Tensor:
    """Assign ground-truth boxes ``Tensor[M, 4]`` to anchors ``Tensor[A, 4]`` (book's signature).

    Returns ``Tensor[A]`` int64, the box index per anchor or -1.
    """
    ground_truth = ground_truth.to(device)
    anchors = anchors.to(device)
    valid = torch.ones(1, ground_truth.shape[0], dtype=torch.bool, device=device)
    return _assign_batched(ground_truth[None], valid, anchors, iou_threshold)[0]


def offset_boxes(anchors: torch.Tensor, assigned_bb: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Encode boxes as offsets from anchors: ``Tensor[..., 4]`` twice -> ``Tensor[..., 4]``.

    Centre offsets are scaled by 10 and log-size offsets by 5, as in the seed.
    """
    c_anc = box_corner_to_center(anchors)
    c_assigned_bb = box_corner_to_center(assigned_bb)
    offset_xy = 10 * (c_assigned_bb[..., :2] - c_anc[..., :2]) / c_anc[..., 2:]
    offset_wh = 5 * torch.log(eps + c_assigned_bb[..., 2:] / c_anc[..., 2:])
    return torch.cat([offset_xy, offset_wh], dim=-1)


def offset_inverse(anchors: torch.Tensor, offset_preds: torch.Tensor) -> torch.Tensor:
    """Decode offsets ``Tensor[..., 4]`` against anchors ``Tensor[..., 4]`` into corner boxes."""
    anc = box_corner_to_center(anchors)
    pred_bbox_xy = (offset_preds[..., :2] * anc[..., 2:] / 10) + anc[..., :2]
    pred_bbox_wh = torch.exp(offset_preds[..., 2:] / 5) * anc[..., 2:]
    return box_center_to_corner(torch.cat((pred_bbox_xy, pred_bbox_wh), dim=-1))


def multibox_target(anchors: torch.Tensor, labels: torch.Tensor, iou_threshold: float = 0.5,
                    check: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label anchors with classes and box offsets.

    Args:
        anchors: ``Tensor[1, A, 4]`` (or ``[A, 4]``).
        labels: ``Tensor[B, M, 5]`` rows ``(class, x1, y1, x2, y2)``; class < 0 marks padding.
        check: refuse non-finite or inverted real boxes with a ``ValueError`` (one host sync).

    Returns:
        ``bbox_offset Tensor[B, A*4]``, ``bbox_mask Tensor[B, A*4]`` (1 where the anchor has
        an object) and ``class_labels Tensor[B, A]`` int64 (0 = background, class + 1 otherwise).
    """
    anchors = anchors.reshape(-1, 4)
    if labels.shape[1] == 0:  # no label rows at all: one padding row keeps the gathers below in range
        labels = torch.full((labels.shape[0], 1, 5), -1.0, dtype=labels.dtype, device=labels.device)
    batch_size = labels.shape[0]
    valid = labels[..., 0] >= 0
    ground_truth = labels[..., 1:]
    if check:
        check_boxes(ground_truth[valid], "labels")
    anchors_bbox_map = _assign_batched(ground_truth, valid, anchors, iou_threshold)
    assigned = anchors_bbox_map >= 0
    index = anchors_bbox_map.clamp(min=0)

    class_labels = labels[..., 0].gather(1, index).long() + 1
    class_labels = torch.where(assigned, class_labels, 0)
    assigned_bb = ground_truth.gather(1, index[..., None].expand(-1, -1, 4)).to(anchors.dtype)
    # Unassigned anchors get an all-zero box, as in the book, so their (masked) offsets are finite.
    assigned_bb = torch.where(assigned[..., None], assigned_bb, 0.0)
    bbox_mask = assigned[..., None].to(anchors.dtype).expand(-1, -1, 4)
    offset = offset_boxes(anchors, assigned_bb) * bbox_mask
    return (offset.reshape(batch_size, -1), bbox_mask.reshape(batch_size, -1), class_labels)


def multibox_detection(cls_probs: torch.Tensor, offset_preds: torch.Tensor, anchors: torch.Tensor,
                       nms_threshold: float = 0.5, pos_threshold: float = 0.009999999, *,
                       per_class: bool = False) -> torch.Tensor:
    """Decode predictions and suppress overlapping boxes.

    Args:
        cls_probs: ``Tensor[B, C + 1, A]`` class probabilities, background first.
        offset_preds: ``Tensor[B, A * 4]``; anchors: ``Tensor[1, A, 4]``.
        per_class: suppress only boxes of the same predicted class (one NMS per image and class);
            the default is the book's class-agnostic NMS (one per image).

    Returns:
        ``Tensor[B, A, 6]`` rows ``(class_id, score, x1, y1, x2, y2)``. Kept detections come
        first in decreasing score, as in the book. Every other row has ``class_id = -1``:
        suppressed rows keep their score and rows scoring under ``pos_threshold`` get
        ``1 - score``, as in the book. NMS runs only on rows at or above ``pos_threshold``
        (those under it end as -1 either way), so the -1 rows follow in anchor order rather
        than the book's mixed order.

    The whole batch goes through one ``batched_nms`` (each image, or image and class, a group):
    no Python loop over images, and on a GPU one host sync (the number of rows above the floor).
    """
    batch_size, num_classes, num_anchors = cls_probs.shape
    device = cls_probs.device
    anchors = anchors.reshape(-1, 4)
    conf, class_id = torch.max(cls_probs[:, 1:], dim=1)
    predicted_bb = offset_inverse(anchors, offset_preds.reshape(batch_size, num_anchors, 4))
    below = conf < pos_threshold

    positions = torch.arange(num_anchors, device=device).expand(batch_size, -1)
    groups = (class_id, num_classes - 1) if per_class else None
    rank, kept = _rank_and_suppress(conf, groups, predicted_bb, ~below, nms_threshold)
    # Kept rows first by rank, then every other row in anchor order.
    order = torch.where(kept, rank, num_anchors + positions).argsort(dim=1)
    class_id = torch.where(kept, class_id, -1)
    conf = torch.where(below, 1 - conf, conf)
    out = torch.cat((class_id.unsqueeze(-1).to(conf.dtype), conf.unsqueeze(-1), predicted_bb.to(conf.dtype)), dim=-1)
    return out.gather(1, order[..., None].expand(-1, -1, 6))


def _rank_and_suppress(conf: torch.Tensor, classes: tuple[torch.Tensor, int] | None, boxes: torch.Tensor,
                       candidate: torch.Tensor, nms_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's rank by decreasing ``conf Tensor[B, A]`` and whether NMS keeps it (``Tensor[B, A]``
    int64 and bool), over the ``candidate`` rows of ``boxes Tensor[B, A, 4]``; with ``classes``
    (``class_id Tensor[B, A]``, the number of classes), one NMS per image and class, else one per image.

    Ranked with the book's own sort so ties break the same way (each row of a CPU sort is sorted on
    its own, as the book's per-image call does); NMS then gets the rank as a strictly decreasing
    stand-in score, so it cannot reorder tied boxes.
    """
    batch_size, num_anchors = conf.shape
    ranked = torch.argsort(conf, dim=-1, descending=True)
    positions = torch.arange(num_anchors, device=conf.device).expand(batch_size, -1)
    rank = torch.empty_like(ranked).scatter_(1, ranked, positions)
    image, anchor = torch.nonzero(candidate, as_tuple=True)
    if classes is None:
        group = image
    else:
        class_id, num_classes = classes
        group = image * num_classes + class_id[image, anchor]
    stand_in = (num_anchors - rank[image, anchor]).float()
    keep = batched_nms(boxes[image, anchor].float(), stand_in, group, nms_threshold)
    kept = torch.zeros(batch_size, num_anchors, dtype=torch.bool, device=conf.device)
    kept[image[keep], anchor[keep]] = True
    return rank, kept


def decode_outputs(anchors: torch.Tensor, cls_preds: torch.Tensor, bbox_preds: torch.Tensor,
                   nms_threshold: float = 0.5, max_detections: int | None = None, *,
                   per_class: bool = False) -> list[torch.Tensor]:
    """The net's outputs (``Tensor[1, A, 4]``, ``Tensor[B, A, C + 1]`` logits, ``Tensor[B, A * 4]``) as detections.

    Returns ``B`` CPU tensors ``Tensor[K, 6]`` rows ``(class_id, score, x1, y1, x2, y2)``, boxes
    normalised to [0, 1], decreasing score, only the rows NMS kept (``class_id >= 0``), at most
    ``max_detections`` of them. ``per_class``: NMS within each class only (the book's is
    class-agnostic), see :func:`multibox_detection`.
    """
    cls_probs = F.softmax(cls_preds.float(), dim=2).permute(0, 2, 1)
    output = multibox_detection(cls_probs, bbox_preds.float(), anchors, nms_threshold, per_class=per_class)
    # One copy to the host, then the per-image selection there (no host sync per image on a GPU).
    # multibox_detection puts the kept rows first, in decreasing score.
    return [rows[rows[:, 0] >= 0][:max_detections] for rows in output.cpu()]
