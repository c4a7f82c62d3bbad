"""Anchor generation, labeling and detection against hand-computed values and the book's own code (d2l).

Equality with d2l is exact (``torch.equal``): our functions are batched rewrites of the book's and
must keep its arithmetic, its greedy assignment order and its tie-breaking.
"""
import d2l.torch as d2l
import pytest
import torch

from ssd.core.anchors import (assign_anchor_to_bbox, multibox_detection, multibox_prior, multibox_target, nms,
                         offset_boxes, offset_inverse)

DTYPES = [torch.float32, torch.float64]

# multibox_prior on a 2x2 map, size 0.5, ratio 1: one half-image square per pixel, pixel-major (x fastest).
PRIOR_2X2 = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]
# A 1x1 map, sizes [0.5, 0.25], ratios [1, 4]: (0.5, r1), (0.25, r1), (0.5, r4: w = 0.5*2, h = 0.5/2).
PRIOR_1X1 = [[0.25, 0.25, 0.75, 0.75], [0.375, 0.375, 0.625, 0.625], [0.0, 0.375, 1.0, 0.625]]
# A 2x4 map (H=2, W=4), size 0.5, ratio 1: width scaled by H/W so the anchor is square in pixels.
PRIOR_2X4_FIRST = [0.0, 0.0, 0.25, 0.5]

# The chapter's labeling example ("Labeling Anchor Boxes in Training Data") and its printed results.
BOOK_GT = [[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]]
BOOK_ANCHORS = [[0, 0.1, 0.2, 0.3], [0.15, 0.2, 0.4, 0.4], [0.63, 0.05, 0.88, 0.98],
                [0.66, 0.45, 0.8, 0.8], [0.57, 0.3, 0.92, 0.9]]
BOOK_CLASSES = [0, 1, 2, 0, 2]
BOOK_MASK = [0.0] * 4 + [1.0] * 8 + [0.0] * 4 + [1.0] * 4
BOOK_OFFSETS = [0, 0, 0, 0, 1.40, 10.0, 2.59, 7.18, -1.20, 0.269, 1.68, -1.57,
                0, 0, 0, 0, -0.571, -1.00, 4.17e-06, 0.626]
# The chapter's NMS example: four anchors, zero offsets; two survive with score 0.9.
NMS_ANCHORS = [[0.1, 0.08, 0.52, 0.92], [0.08, 0.2, 0.56, 0.95], [0.15, 0.3, 0.62, 0.91], [0.55, 0.2, 0.9, 0.88]]
NMS_PROBS = [[0.0] * 4, [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]]
NMS_KEPT = [[0, 0.9, 0.1, 0.08, 0.52, 0.92], [1, 0.9, 0.55, 0.2, 0.9, 0.88]]


def random_boxes(n: int, g: torch.Generator, min_size: float = 1e-3) -> torch.Tensor:
    """``Tensor[n, 4]`` valid corner boxes inside [0, 1]."""
    xy = torch.rand(n, 2, 2, generator=g)
    lo, hi = xy.min(dim=1).values, xy.max(dim=1).values
    return torch.cat([lo, torch.maximum(hi, lo + min_size)], dim=1)


def random_labels(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """``Tensor[n, 5]`` label rows with classes in 0..num_classes-1."""
    cls = torch.randint(0, num_classes, (n, 1), generator=g).float()
    return torch.cat([cls, random_boxes(n, g)], dim=1)


def small_anchors(h: int = 4, w: int = 4) -> torch.Tensor:
    """``Tensor[1, A, 4]`` realistic anchors from a small feature map."""
    return multibox_prior(torch.zeros(1, 1, h, w), sizes=[0.75, 0.5, 0.25], ratios=[1, 2, 0.5])


def d2l_target_per_image(anchors: torch.Tensor, labels: list[torch.Tensor]):
    """The book's multibox_target run image by image on unpadded labels, stacked."""
    outs = [d2l.multibox_target(anchors, lab[None]) for lab in labels]
    return tuple(torch.cat([o[k] for o in outs]) for k in range(3))


def pad(labels: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.full((len(labels), width, 5), -1.0)
    for i, lab in enumerate(labels):
        out[i, : len(lab)] = lab
    return out


def sorted_rows(t: torch.Tensor) -> list[list[float]]:
    return sorted(t.tolist())


def assert_same_detections(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Kept rows equal and in order; all rows equal as a multiset (the -1 rows' order differs, as documented)."""
    assert ours.shape == ref.shape
    for o, r in zip(ours, ref):
        n_kept = int((o[:, 0] >= 0).sum())
        assert bool((o[:n_kept, 0] >= 0).all()), "kept rows must come first"
        assert torch.equal(o[o[:, 0] >= 0], r[r[:, 0] >= 0])
        assert sorted_rows(o) == sorted_rows(r)


class TestMultiboxPrior:
    def test_hand_computed_2x2(self):
        anchors = multibox_prior(torch.zeros(1, 3, 2, 2), sizes=[0.5], ratios=[1])
        torch.testing.assert_close(anchors, torch.tensor([PRIOR_2X2]))

    def test_hand_computed_sizes_and_ratios(self):
        anchors = multibox_prior(torch.zeros(1, 3, 1, 1), sizes=[0.5, 0.25], ratios=[1, 4])
        torch.testing.assert_close(anchors, torch.tensor([PRIOR_1X1]))

    def test_hand_computed_non_square(self):
        anchors = multibox_prior(torch.zeros(2, 4), sizes=[0.5], ratios=[1])
        assert anchors.shape == (1, 8, 4)
        torch.testing.assert_close(anchors[0, 0], torch.tensor(PRIOR_2X4_FIRST))

    @pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (3, 5), (5, 3), (8, 8), (16, 16), (32, 32), (40, 32)])
    @pytest.mark.parametrize("sizes, ratios", [
        ([0.75, 0.5, 0.25], [1, 2, 0.5]),
        ([0.2, 0.272], [1, 2, 0.5]),
        ([0.88, 0.961], [1, 2, 0.5]),
        ([0.3], [1]),
        ([0.4, 0.1], [0.5, 3, 1.7]),
    ])
    def test_matches_d2l(self, h, w, sizes, ratios):
        data = torch.zeros(2, 3, h, w)
        ours, ref = multibox_prior(data, sizes, ratios), d2l.multibox_prior(data, sizes, ratios)
        assert ours.shape == (1, h * w * (len(sizes) + len(ratios) - 1), 4)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, ref)


class TestOffsets:
    @pytest.mark.parametrize("seed", range(6))
    def test_offset_boxes_matches_d2l(self, seed):
        g = torch.Generator().manual_seed(seed)
        anchors, boxes = random_boxes(30, g), random_boxes(30, g)
        assert torch.equal(offset_boxes(anchors, boxes), d2l.offset_boxes(anchors, boxes))

    @pytest.mark.parametrize("seed", range(6))
    def test_offset_inverse_matches_d2l(self, seed):
        g = torch.Generator().manual_seed(seed)
        anchors, offsets = random_boxes(30, g), torch.randn(30, 4, generator=g) * 2
        assert torch.equal(offset_inverse(anchors, offsets), d2l.offset_inverse(anchors, offsets))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_roundtrip(self, dtype):
        g = torch.Generator().manual_seed(0)
        anchors, boxes = random_boxes(40, g).to(dtype), random_boxes(40, g, min_size=0.05).to(dtype)
        decoded = offset_inverse(anchors, offset_boxes(anchors, boxes))
        assert decoded.dtype == dtype
        # eps=1e-6 inside the log makes the roundtrip inexact by about 1e-6 relative.
        torch.testing.assert_close(decoded, boxes, rtol=0, atol=1e-5)

    def test_hand_computed(self):
        anchor = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
        box = torch.tensor([[0.25, 0.0, 0.75, 1.0]])  # centre moves by +0.25 in x and +0.25 in y; height doubles
        expected = torch.tensor([[10 * 0.25 / 0.5, 10 * 0.25 / 0.5, 5 * torch.log(torch.tensor(1 + 1e-6)),
                                  5 * torch.log(torch.tensor(2 + 1e-6))]])
        torch.testing.assert_close(offset_boxes(anchor, box), expected)

    def test_batched_leading_dims(self):
        g = torch.Generator().manual_seed(3)
        anchors, offsets = random_boxes(12, g), torch.randn(12, 4, generator=g)
        batched = offset_inverse(anchors.reshape(3, 4, 4), offsets.reshape(3, 4, 4))
        assert torch.equal(batched.reshape(12, 4), offset_inverse(anchors, offsets))


class TestAssignAnchorToBbox:
    @pytest.mark.parametrize("seed", range(10))
    @pytest.mark.parametrize("threshold", [0.5, 0.3])
    def test_matches_d2l(self, seed, threshold):
        g = torch.Generator().manual_seed(seed)
        anchors = small_anchors()[0]
        gt = random_boxes(1 + seed % 5, g)
        ours = assign_anchor_to_bbox(gt, anchors, torch.device("cpu"), threshold)
        ref = d2l.assign_anchor_to_bbox(gt, anchors, torch.device("cpu"), threshold)
        assert ours.dtype == torch.long
        assert torch.equal(ours, ref)

    def test_hand_computed(self):
        # Anchor 0 overlaps box 0 best; anchor 1 reaches the threshold with box 1; anchor 2 overlaps nothing.
        anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.6, 0.2, 0.8], [0.5, 0.5, 0.9, 0.9]])
        gt = torch.tensor([[0.0, 0.0, 0.4, 0.5], [0.5, 0.5, 0.95, 0.95]])
        # IoU(anchor 3, box 1) = 0.16 / 0.2025 = 0.79 >= 0.5, so anchor 3 also takes box 1.
        assert assign_anchor_to_bbox(gt, anchors, torch.device("cpu")).tolist() == [0, 1, -1, 1]


class TestMultiboxTarget:
    def test_book_example(self):
        labels = torch.tensor([BOOK_GT])
        offset, mask, classes = multibox_target(torch.tensor([BOOK_ANCHORS]), labels)
        assert classes.tolist() == [BOOK_CLASSES]
        assert mask.tolist() == [BOOK_MASK]
        torch.testing.assert_close(offset, torch.tensor([BOOK_OFFSETS]), rtol=0, atol=6e-3)

    @pytest.mark.parametrize("seed", range(12))
    @pytest.mark.parametrize("num_boxes", [1, 2, 3, 6])
    def test_matches_d2l(self, seed, num_boxes):
        g = torch.Generator().manual_seed(seed * 10 + num_boxes)
        anchors = small_anchors(3 + seed % 3, 4)
        labels = random_labels(num_boxes, 3, g)[None]
        ours, ref = multibox_target(anchors, labels), d2l.multibox_target(anchors, labels)
        for o, r in zip(ours, ref):
            assert o.dtype == r.dtype and torch.equal(o, r)

    @pytest.mark.parametrize("case", ["duplicate_gt", "identical_anchors", "border", "tiny", "far_from_anchors",
                                      "more_boxes_than_anchors", "whole_image"])
    def test_ties_and_edges_match_d2l(self, case):
        g = torch.Generator().manual_seed(7)
        anchors = small_anchors()
        if case == "duplicate_gt":
            box = [0.2, 0.3, 0.6, 0.7]
            labels = torch.tensor([[0, *box], [1, *box], [0, *box], [1, 0.1, 0.1, 0.3, 0.3]])
        elif case == "identical_anchors":
            anchors = torch.cat([anchors, anchors, anchors], dim=1)
            labels = random_labels(4, 2, g)
        elif case == "border":
            labels = torch.tensor([[0, 0.0, 0.0, 0.5, 0.5], [0, 0.5, 0.5, 1.0, 1.0], [1, 0.0, 0.0, 1.0, 1.0],
                                   [0, 0.0, 0.9, 1.0, 1.0]])
        elif case == "tiny":
            labels = torch.tensor([[0, 0.5, 0.5, 0.501, 0.501], [0, 0.0, 0.0, 1e-4, 1e-4], [1, 0.999, 0.999, 1.0, 1.0]])
        elif case == "far_from_anchors":  # zero IoU with every anchor: the greedy step still places it
            anchors = anchors[:, anchors[0, :, 2] <= 0.5]
            labels = torch.tensor([[0, 0.8, 0.8, 0.9, 0.9], [0, 0.1, 0.1, 0.3, 0.3]])
        elif case == "more_boxes_than_anchors":
            anchors = anchors[:, :2]
            labels = random_labels(4, 2, g)
        else:
            labels = torch.tensor([[0, 0.0, 0.0, 1.0, 1.0]])
        ours, ref = multibox_target(anchors, labels[None]), d2l.multibox_target(anchors, labels[None])
        for o, r in zip(ours, ref):
            assert torch.equal(o, r)

    @pytest.mark.parametrize("seed", range(6))
    def test_padded_batch_matches_d2l_per_image(self, seed):
        g = torch.Generator().manual_seed(100 + seed)
        anchors = small_anchors(4, 3)
        labels = [random_labels(n, 2, g) for n in (1, 4, 2, 3)]
        ours = multibox_target(anchors, pad(labels, 5))
        ref = d2l_target_per_image(anchors, labels)
        for o, r in zip(ours, ref):
            assert torch.equal(o, r)

    def test_padding_rows_ignored_whatever_their_coordinates(self):
        g = torch.Generator().manual_seed(5)
        anchors = small_anchors()
        real = random_labels(2, 2, g)
        clean = pad([real], 4)
        garbage = clean.clone()
        garbage[0, 2] = torch.tensor([-1.0, 0.9, 0.9, 0.1, float("nan")])  # inverted and NaN, but padding
        garbage[0, 3] = torch.tensor([-3.0, 0.2, 0.3, 0.6, 0.7])            # any negative class is padding
        for a, b in zip(multibox_target(anchors, clean), multibox_target(anchors, garbage)):
            assert torch.equal(a, b)

    def test_image_without_objects_is_all_background(self):
        g = torch.Generator().manual_seed(6)
        anchors = small_anchors()
        labels = pad([torch.zeros(0, 5), random_labels(2, 1, g)], 3)
        offset, mask, classes = multibox_target(anchors, labels)
        num_anchors = anchors.shape[1]
        assert offset.shape == mask.shape == (2, num_anchors * 4) and classes.shape == (2, num_anchors)
        assert classes.dtype == torch.long
        assert not classes[0].any() and not mask[0].any() and not offset[0].any()
        ref = d2l.multibox_target(anchors, labels[1:, :2])
        assert all(torch.equal(o[1:], r) for o, r in zip((offset, mask, classes), ref))

    def test_no_label_rows_at_all(self):
        anchors = small_anchors()
        offset, mask, classes = multibox_target(anchors, torch.zeros(3, 0, 5))
        assert classes.shape == (3, anchors.shape[1]) and not classes.any() and not mask.any()

    @pytest.mark.parametrize("bad, match", [
        ([0, float("nan"), 0.1, 0.5, 0.5], "labels: box #1 .*not finite"),
        ([0, 0.6, 0.1, 0.5, 0.5], "labels: box #1 .*inverted"),
        ([1, 0.1, 0.5, 0.5, 0.5], "labels: box #1 .*empty"),
    ])
    def test_bad_boxes_raise(self, bad, match):
        labels = torch.tensor([[[0, 0.1, 0.1, 0.4, 0.4], bad]])
        with pytest.raises(ValueError, match=match):
            multibox_target(small_anchors(), labels)

    def test_check_false_skips_validation(self):
        labels = torch.tensor([[[0, 0.6, 0.1, 0.5, 0.5]]])  # inverted, but the caller vouches for its data
        offset, mask, classes = multibox_target(small_anchors(), labels, check=False)
        assert classes.shape == (1, small_anchors().shape[1])


class TestNms:
    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
    def test_matches_d2l(self, seed, threshold):
        g = torch.Generator().manual_seed(seed)
        boxes, scores = random_boxes(60, g, min_size=0.05), torch.rand(60, generator=g)
        assert torch.equal(nms(boxes, scores, threshold), d2l.nms(boxes, scores, threshold))


class TestMultiboxDetection:
    def test_book_example(self):
        out = multibox_detection(torch.tensor([NMS_PROBS]), torch.zeros(1, 16), torch.tensor([NMS_ANCHORS]))
        assert out.shape == (1, 4, 6)
        torch.testing.assert_close(out[0, :2], torch.tensor(NMS_KEPT))
        assert out[0, 2:, 0].tolist() == [-1, -1]
        assert sorted(out[0, 2:, 1].tolist()) == pytest.approx([0.7, 0.8])

    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("num_classes", [1, 3])
    @pytest.mark.parametrize("nms_threshold", [0.3, 0.5])
    def test_matches_d2l(self, seed, num_classes, nms_threshold):
        g = torch.Generator().manual_seed(seed)
        anchors = small_anchors(4, 5)
        batch, num_anchors = 2, anchors.shape[1]
        # A large logit scale pushes some scores under pos_threshold (those rows get 1 - score).
        logits = torch.randn(batch, num_classes + 1, num_anchors, generator=g) * (1 + seed)
        cls_probs = torch.softmax(logits, dim=1)
        offsets = torch.randn(batch, num_anchors * 4, generator=g) * 0.5
        ours = multibox_detection(cls_probs, offsets, anchors, nms_threshold)
        ref = torch.cat([d2l.multibox_detection(cls_probs[i:i + 1], offsets[i:i + 1], anchors, nms_threshold)
                         for i in range(batch)])
        assert_same_detections(ours, ref)

    @pytest.mark.parametrize("num_classes", [1, 2])
    @pytest.mark.parametrize("zero_offsets", [True, False])
    def test_tied_scores_match_d2l(self, num_classes, zero_offsets):
        anchors = small_anchors(3, 3)
        num_anchors = anchors.shape[1]
        # Softmax of constant logits: every anchor has the same score, and classes tie too.
        cls_probs = torch.softmax(torch.zeros(2, num_classes + 1, num_anchors), dim=1)
        offsets = torch.zeros(2, num_anchors * 4) if zero_offsets else \
            torch.randn(2, num_anchors * 4, generator=torch.Generator().manual_seed(0)) * 0.3
        ours = multibox_detection(cls_probs, offsets, anchors)
        ref = torch.cat([d2l.multibox_detection(cls_probs[i:i + 1], offsets[i:i + 1], anchors) for i in range(2)])
        assert_same_detections(ours, ref)

    def test_all_below_pos_threshold(self):
        anchors = small_anchors(2, 2)
        num_anchors = anchors.shape[1]
        cls_probs = torch.stack([torch.full((num_anchors,), 0.995), torch.full((num_anchors,), 0.005)])[None]
        out = multibox_detection(cls_probs, torch.zeros(1, num_anchors * 4), anchors)
        assert (out[0, :, 0] == -1).all()
        torch.testing.assert_close(out[0, :, 1], torch.full((num_anchors,), 0.995))
        assert_same_detections(out, d2l.multibox_detection(cls_probs, torch.zeros(1, num_anchors * 4), anchors))

    def test_large_batch_matches_d2l(self):
        """Over 1000 rows above the floor (torchvision's batched NMS then runs group by group on a CPU)."""
        g = torch.Generator().manual_seed(7)
        anchors = small_anchors(16, 16)
        batch, num_anchors = 3, anchors.shape[1]
        cls_probs = torch.softmax(torch.randn(batch, 2, num_anchors, generator=g) * 2, dim=1)
        offsets = torch.randn(batch, num_anchors * 4, generator=g) * 0.3
        ours = multibox_detection(cls_probs, offsets, anchors)
        assert int((cls_probs[:, 1] >= 0.01).sum()) > 1000
        ref = torch.cat([d2l.multibox_detection(cls_probs[i:i + 1], offsets[i:i + 1], anchors) for i in range(batch)])
        assert_same_detections(ours, ref)

    @pytest.mark.parametrize("seed", range(4))
    def test_per_class_suppresses_within_each_class_only(self, seed):
        g = torch.Generator().manual_seed(seed)
        anchors = small_anchors(4, 5)
        batch, num_classes, num_anchors = 2, 3, anchors.shape[1]
        cls_probs = torch.softmax(torch.randn(batch, num_classes + 1, num_anchors, generator=g) * 2, dim=1)
        offsets = torch.randn(batch, num_anchors * 4, generator=g) * 0.3
        ours = multibox_detection(cls_probs, offsets, anchors, 0.5, per_class=True)
        agnostic = multibox_detection(cls_probs, offsets, anchors, 0.5)
        # Reference: one torchvision NMS per image and class on the rows above the floor, in rank order.
        conf, cls = cls_probs[:, 1:].max(dim=1)
        boxes = offset_inverse(anchors[0], offsets.reshape(batch, num_anchors, 4))
        for i in range(batch):
            ranked = torch.argsort(conf[i], descending=True)
            ranked = ranked[conf[i, ranked] >= 0.009999999]
            kept = []
            for c in range(num_classes):
                rows = ranked[cls[i, ranked] == c]
                kept += rows[nms(boxes[i, rows], torch.arange(len(rows), 0, -1).float(), 0.5)].tolist()
            kept.sort(key=lambda a: ranked.tolist().index(a))
            n = len(kept)
            assert (ours[i, :n, 0] >= 0).all() and (ours[i, n:, 0] == -1).all()
            torch.testing.assert_close(ours[i, :n, 2:], boxes[i, kept], rtol=0, atol=0)
            assert ours[i, :n, 0].long().tolist() == cls[i, kept].tolist()
            # Per-class NMS keeps at least what class-agnostic NMS keeps.
            assert n >= int((agnostic[i, :, 0] >= 0).sum())

    def test_one_class_per_class_is_the_book(self):
        g = torch.Generator().manual_seed(3)
        anchors = small_anchors(4, 5)
        cls_probs = torch.softmax(torch.randn(2, 2, anchors.shape[1], generator=g) * 2, dim=1)
        offsets = torch.randn(2, anchors.shape[1] * 4, generator=g) * 0.3
        assert torch.equal(multibox_detection(cls_probs, offsets, anchors, per_class=True),
                           multibox_detection(cls_probs, offsets, anchors))
