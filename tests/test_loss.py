"""The loss and metrics against the chapter's own three definitions, written out here as the reference."""
import pytest
import torch
from torch import nn

from ssd.anchors import multibox_prior, multibox_target
from ssd.loss import bbox_eval, calc_loss, cls_eval

# --- The chapter's definitions ("Defining Loss and Evaluation Functions"). ---
_cls_loss = nn.CrossEntropyLoss(reduction='none')
_bbox_loss = nn.L1Loss(reduction='none')


def chapter_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks):
    batch_size, num_classes = cls_preds.shape[0], cls_preds.shape[2]
    cls = _cls_loss(cls_preds.reshape(-1, num_classes), cls_labels.reshape(-1)).reshape(batch_size, -1).mean(dim=1)
    bbox = _bbox_loss(bbox_preds * bbox_masks, bbox_labels * bbox_masks).mean(dim=1)
    return cls + bbox


def chapter_cls_eval(cls_preds, cls_labels):
    # Because the class prediction results are on the final dimension, `argmax` needs to specify this dimension
    return float((cls_preds.argmax(dim=-1).type(cls_labels.dtype) == cls_labels).sum())


def chapter_bbox_eval(bbox_preds, bbox_labels, bbox_masks):
    return float((torch.abs((bbox_labels - bbox_preds) * bbox_masks)).sum())


def make_batch(seed: int, batch: int = 3, num_classes: int = 1):
    """Predictions and targets as training produces them: random predictions, real multibox_target labels."""
    g = torch.Generator().manual_seed(seed)
    anchors = multibox_prior(torch.zeros(4, 4), [0.75, 0.5, 0.25], [1, 2, 0.5])
    num_anchors = anchors.shape[1]
    lo = torch.rand(batch, 2, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.1 + torch.rand(batch, 2, 2, generator=g) * 0.4], dim=2)
    cls = torch.randint(0, num_classes, (batch, 2, 1), generator=g).float()
    labels = torch.cat([cls, boxes], dim=2)
    labels[0, 1] = -1  # one padding row
    bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, labels)
    cls_preds = torch.randn(batch, num_anchors, num_classes + 1, generator=g)
    bbox_preds = torch.randn(batch, num_anchors * 4, generator=g)
    return cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks


class TestCalcLoss:
    @pytest.mark.parametrize("seed", range(4))
    @pytest.mark.parametrize("num_classes", [1, 3])
    def test_matches_chapter(self, seed, num_classes):
        args = make_batch(seed, num_classes=num_classes)
        ours = calc_loss(*args)
        assert ours.shape == (3,)
        torch.testing.assert_close(ours, chapter_calc_loss(*args), rtol=1e-6, atol=1e-6)

    def test_hand_computed(self):
        # Uniform logits over 2 classes: cross entropy log(2) per anchor; one masked offset off by 2 of 8 values.
        cls_preds, cls_labels = torch.zeros(1, 2, 2), torch.tensor([[0, 1]])
        bbox_preds = torch.tensor([[2.0, 0, 0, 0, 5, 5, 5, 5]])
        bbox_labels, bbox_masks = torch.zeros(1, 8), torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]])
        loss = calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
        torch.testing.assert_close(loss, torch.tensor([torch.log(torch.tensor(2.0)) + 2 / 8]))

    def test_low_precision_predictions_give_float32_loss(self):
        cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks = make_batch(0)
        loss = calc_loss(cls_preds.bfloat16(), cls_labels, bbox_preds.bfloat16(), bbox_labels, bbox_masks)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, chapter_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks),
                                   rtol=2e-2, atol=2e-2)

    def test_gradient_matches_chapter(self):
        cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks = make_batch(1)
        grads = []
        for fn in (calc_loss, chapter_calc_loss):
            c, b = cls_preds.clone().requires_grad_(), bbox_preds.clone().requires_grad_()
            fn(c, cls_labels, b, bbox_labels, bbox_masks).mean().backward()
            grads.append((c.grad, b.grad))
        for o, r in zip(*grads):
            torch.testing.assert_close(o, r)


class TestMetrics:
    @pytest.mark.parametrize("seed", range(4))
    def test_cls_eval_matches_chapter(self, seed):
        cls_preds, cls_labels, *_ = make_batch(seed, num_classes=2)
        ours = cls_eval(cls_preds, cls_labels)
        assert ours.dim() == 0  # a tensor, so a loop can sum on the device
        assert float(ours) == chapter_cls_eval(cls_preds, cls_labels)

    @pytest.mark.parametrize("seed", range(4))
    def test_bbox_eval_matches_chapter(self, seed):
        _, _, bbox_preds, bbox_labels, bbox_masks = make_batch(seed)
        ours = bbox_eval(bbox_preds, bbox_labels, bbox_masks)
        assert ours.dim() == 0
        assert float(ours) == pytest.approx(chapter_bbox_eval(bbox_preds, bbox_labels, bbox_masks), rel=1e-6)

    def test_hand_computed(self):
        cls_preds = torch.tensor([[[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]])  # argmax 0, 1, 0
        assert int(cls_eval(cls_preds, torch.tensor([[0, 1, 1]]))) == 2
        err = bbox_eval(torch.tensor([[1.0, -1.0, 3.0, 0.0]]), torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
        assert float(err) == 2.0
