"""The ``photos`` recipe's loss: hard negatives, focal modulation, box error on positives only, per positive."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from ssd.core.anchors import multibox_prior, multibox_target, offset_boxes
from ssd.core.loss import detection_loss, focal_ce, hard_negative_ce, positive_box_loss


def ce(logits, label):
    return float(F.cross_entropy(torch.tensor([logits]), torch.tensor([label])))


class TestHardNegatives:
    def test_positives_and_the_three_worst_negatives_count(self):
        # One positive; five negatives of increasing background loss: the three worst are mined.
        logits = [[0.0, 2.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
        labels = [1, 0, 0, 0, 0, 0]
        loss = hard_negative_ce(torch.tensor([logits]), torch.tensor([labels]))
        expected = ce(logits[0], 1) + ce(logits[3], 0) + ce(logits[4], 0) + ce(logits[5], 0)
        assert loss.shape == (1,)
        assert float(loss[0]) == pytest.approx(expected)

    def test_an_image_without_positives_adds_nothing(self):
        loss = hard_negative_ce(torch.randn(2, 7, 3), torch.zeros(2, 7, dtype=torch.long))
        assert loss.tolist() == [0.0, 0.0]

    def test_never_more_negatives_than_there_are(self):
        logits = torch.randn(1, 3, 2)
        loss = hard_negative_ce(logits, torch.tensor([[1, 0, 0]]))  # 3 wanted, 2 there: all taken
        full = F.cross_entropy(logits[0], torch.tensor([1, 0, 0]), reduction="sum")
        assert float(loss[0]) == pytest.approx(float(full))


class TestFocal:
    def test_without_modulation_it_is_weighted_cross_entropy(self):
        logits, labels = torch.randn(2, 5, 3), torch.tensor([[0, 1, 2, 0, 0], [2, 0, 0, 0, 1]])
        loss = focal_ce(logits, labels, gamma=0.0, alpha=0.5)
        full = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)
        torch.testing.assert_close(loss, 0.5 * full)

    def test_easy_anchors_weigh_less(self):
        labels = torch.tensor([[0]])
        easy, hard = torch.tensor([[[4.0, 0.0]]]), torch.tensor([[[0.0, 0.0]]])
        ratio_focal = float(focal_ce(easy, labels) / focal_ce(hard, labels))
        ratio_ce = float(focal_ce(easy, labels, gamma=0.0) / focal_ce(hard, labels, gamma=0.0))
        assert ratio_focal < ratio_ce / 10


def batch():
    anchors = multibox_prior(torch.zeros(4, 4), [0.5, 0.3], [1, 2, 0.5])
    labels = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.6]], [[0, 0.4, 0.3, 0.9, 0.8]]])
    bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, labels)
    return anchors, bbox_labels, bbox_masks, cls_labels


class TestPositiveBoxLoss:
    def test_exact_offsets_cost_nothing_whatever_the_background_predicts(self):
        anchors, bbox_labels, bbox_masks, _ = batch()
        noise = torch.randn_like(bbox_labels) * (1 - bbox_masks)  # only background slots differ
        loss = positive_box_loss(anchors, bbox_labels + noise, bbox_labels, bbox_masks)
        torch.testing.assert_close(loss, torch.zeros(2), atol=1e-5, rtol=0)

    def test_giou_and_smooth_l1_of_one_shifted_positive(self):
        anchors = torch.tensor([[[0.2, 0.2, 0.6, 0.6], [0.0, 0.0, 0.1, 0.1]]])
        truth = torch.tensor([[0.25, 0.2, 0.65, 0.7]])
        target = torch.cat((offset_boxes(anchors[0, :1], truth), torch.zeros(1, 4)), dim=0).reshape(1, 8)
        masks = torch.tensor([[1.0] * 4 + [0.0] * 4])
        pred = target.clone()
        pred[0, 0] += 0.5  # the positive's centre x is off
        loss = positive_box_loss(anchors, pred, target, masks, giou_weight=2.0, l1_weight=1.0)
        decoded = torch.tensor([[0.27, 0.2, 0.67, 0.7]])  # 0.5 / 10 of the anchor's width 0.4 to the right
        giou = generalized_box_iou_loss(decoded, truth)
        torch.testing.assert_close(loss, (2 * giou + 0.5 * 0.5 ** 2).reshape(1), atol=1e-5, rtol=1e-5)


class TestDetectionLoss:
    def test_divided_by_the_number_of_positives(self):
        anchors, bbox_labels, bbox_masks, cls_labels = batch()
        g = torch.Generator().manual_seed(0)
        cls_preds = torch.randn(2, anchors.shape[1], 2, generator=g)
        bbox_preds = torch.randn(2, anchors.shape[1] * 4, generator=g)
        loss = detection_loss(anchors, cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
        total = (hard_negative_ce(cls_preds, cls_labels)
                 + positive_box_loss(anchors, bbox_preds, bbox_labels, bbox_masks)).sum()
        positives = int((cls_labels > 0).sum())
        assert positives > 2
        assert float(loss.mean()) == pytest.approx(float(total) / positives)
        focal = detection_loss(anchors, cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks, cls="focal")
        assert not math.isclose(float(focal.mean()), float(loss.mean()))

    def test_gradients_reach_only_positive_box_slots(self):
        anchors, bbox_labels, bbox_masks, cls_labels = batch()
        bbox_preds = torch.randn(2, anchors.shape[1] * 4, requires_grad=True)
        cls_preds = torch.randn(2, anchors.shape[1], 2, requires_grad=True)
        detection_loss(anchors, cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks).mean().backward()
        assert torch.all(bbox_preds.grad[bbox_masks == 0] == 0)
        assert torch.any(bbox_preds.grad[bbox_masks == 1] != 0)
        assert torch.isfinite(cls_preds.grad).all()

