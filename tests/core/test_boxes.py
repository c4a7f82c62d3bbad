"""Box helpers: hand-computed constants, the book's (d2l) functions as the reference, input checks."""
import math

import d2l.torch as d2l
import pytest
import torch

from ssd.core.boxes import box_center_to_corner, box_corner_to_center, box_iou, check_boxes

DTYPES = [torch.float32, torch.float64]

# (box1, box2, IoU) computed by hand.
IOU_CASES = [
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),       # overlap 1, union 4 + 4 - 1
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),         # identical
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16),      # contained
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),         # touching edges
    ([0, 0, 1, 1], [2, 2, 3, 3], 0.0),         # disjoint
    ([0, 0, 2, 1], [1, 0, 3, 1], 1 / 3),       # half overlap along x
]
# Corner box and its centre form, by hand.
CORNER = [[0.1, 0.2, 0.5, 0.8], [0.0, 0.0, 1.0, 1.0]]
CENTER = [[0.3, 0.5, 0.4, 0.6], [0.5, 0.5, 1.0, 1.0]]


def random_boxes(n: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``Tensor[n, 4]`` valid corner boxes inside [0, 1]."""
    xy = torch.rand(n, 2, 2, generator=generator, dtype=dtype)
    lo, hi = xy.min(dim=1).values, xy.max(dim=1).values + 1e-3
    return torch.cat([lo, hi], dim=1)


class TestBoxIou:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("box1, box2, expected", IOU_CASES)
    def test_hand_computed(self, box1, box2, expected, dtype):
        iou = box_iou(torch.tensor([box1], dtype=dtype), torch.tensor([box2], dtype=dtype))
        assert iou.shape == (1, 1) and iou.dtype == dtype
        assert math.isclose(float(iou), expected, rel_tol=1e-6, abs_tol=1e-12)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_symmetric_matrix(self, dtype):
        boxes = torch.tensor([c[0] for c in IOU_CASES], dtype=dtype)
        iou = box_iou(boxes, boxes)
        torch.testing.assert_close(iou, iou.T)
        torch.testing.assert_close(iou.diagonal(), torch.ones(len(boxes), dtype=dtype))

    @pytest.mark.parametrize("seed", range(8))
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_matches_d2l(self, seed, dtype):
        g = torch.Generator().manual_seed(seed)
        b1, b2 = random_boxes(7 + seed, g, dtype), random_boxes(11, g, dtype)
        ours, ref = box_iou(b1, b2), d2l.box_iou(b1, b2)
        assert ours.shape == (7 + seed, 11)
        assert torch.equal(ours, ref)

    def test_empty(self):
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        assert box_iou(torch.zeros(0, 4), boxes).shape == (0, 1)
        assert box_iou(boxes, torch.zeros(0, 4)).shape == (1, 0)


class TestBoxConvert:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_hand_computed(self, dtype):
        corner, center = torch.tensor(CORNER, dtype=dtype), torch.tensor(CENTER, dtype=dtype)
        torch.testing.assert_close(box_corner_to_center(corner), center)
        torch.testing.assert_close(box_center_to_corner(center), corner)
        assert box_corner_to_center(corner).dtype == dtype

    @pytest.mark.parametrize("seed", range(5))
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_matches_d2l(self, seed, dtype):
        g = torch.Generator().manual_seed(seed)
        boxes = random_boxes(20, g, dtype)
        assert torch.equal(box_corner_to_center(boxes), d2l.box_corner_to_center(boxes))
        center = d2l.box_corner_to_center(boxes)
        assert torch.equal(box_center_to_corner(center), d2l.box_center_to_corner(center))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_roundtrip(self, dtype):
        boxes = random_boxes(50, torch.Generator().manual_seed(0), dtype)
        torch.testing.assert_close(box_center_to_corner(box_corner_to_center(boxes)), boxes)

    def test_batched_leading_dims(self):
        boxes = random_boxes(12, torch.Generator().manual_seed(1)).reshape(3, 4, 4)
        out = box_corner_to_center(boxes)
        assert out.shape == (3, 4, 4)
        assert torch.equal(out.reshape(12, 4), box_corner_to_center(boxes.reshape(12, 4)))

    def test_does_not_alias_input(self):
        boxes = torch.tensor(CORNER)
        box_center_to_corner(box_corner_to_center(boxes)).add_(1)
        assert torch.equal(boxes, torch.tensor(CORNER))


class TestCheckBoxes:
    def test_valid_and_empty_pass(self):
        assert check_boxes(torch.tensor(CORNER)) is None
        assert check_boxes(torch.zeros(0, 4)) is None

    @pytest.mark.parametrize("bad, reason", [
        ([float("nan"), 0.1, 0.5, 0.5], "not finite"),
        ([0.1, 0.1, float("inf"), 0.5], "not finite"),
        ([0.5, 0.1, 0.2, 0.5], "inverted"),   # x2 < x1
        ([0.1, 0.5, 0.2, 0.4], "inverted"),   # y2 < y1
        ([0.1, 0.1, 0.1, 0.5], "empty"),      # zero width
    ])
    def test_bad_box_raises(self, bad, reason):
        boxes = torch.tensor([CORNER[0], bad])
        with pytest.raises(ValueError, match=rf"my labels: box #1 .*{reason}"):
            check_boxes(boxes, "my labels")
