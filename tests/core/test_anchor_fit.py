"""Anchors fitted to the training boxes: they cover boxes the book's anchors miss, deterministically."""
import pytest
import torch

from ssd.core.anchor_fit import MAX_STRIDES, RATIO_GRID, SIZE_GRID, anchor_coverage, fit_anchors
from ssd.core.model import TinySSD, feature_map_sizes


def tall_boxes(n: int = 200, seed: int = 0) -> torch.Tensor:
    """Pedestrian-like boxes: width 0.1-0.2, height four times that, anywhere in the image."""
    g = torch.Generator().manual_seed(seed)
    w = 0.1 + 0.1 * torch.rand(n, generator=g)
    h = 4 * w
    x = torch.rand(n, generator=g) * (1 - w)
    y = torch.rand(n, generator=g) * (1 - h)
    return torch.stack((x, y, x + w, y + h), dim=1)


def test_fitted_anchors_cover_boxes_the_book_anchors_miss():
    boxes, maps = tall_boxes(), feature_map_sizes(128, 128)
    sizes, ratios = fit_anchors(boxes, maps)
    book, fitted = TinySSD(1, image_size=128).anchors, TinySSD(1, sizes=sizes, ratios=ratios, image_size=128).anchors
    assert anchor_coverage(fitted, boxes) > 0.95 > 0.75 > anchor_coverage(book, boxes)
    assert anchor_coverage(fitted, boxes, iou=0.7) > 0.8 > 0.1 > anchor_coverage(book, boxes, iou=0.7)
    assert ratios[0] == pytest.approx(0.25, rel=0.2)  # the typical shape goes with every size
    assert len(sizes) == 5 and all(len(row) == 2 for row in sizes) and len(ratios) == 3
    assert all(s in SIZE_GRID for row in sizes for s in row) and all(r in RATIO_GRID for r in ratios)


def test_the_fit_is_deterministic_and_follows_the_data():
    boxes, maps = tall_boxes(), feature_map_sizes(128, 128)
    assert fit_anchors(boxes, maps) == fit_anchors(boxes.clone(), maps)
    wide = boxes[:, [1, 0, 3, 2]]  # the same boxes lying down: widths and heights swapped
    assert fit_anchors(wide, maps)[1][0] == pytest.approx(4.0, rel=0.2)


def test_no_boxes_is_refused():
    with pytest.raises(ValueError, match="no boxes"):
        fit_anchors(torch.zeros(0, 4), feature_map_sizes(64, 64))


def test_coverage_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]])  # IoU 1, 0.5, 0
    assert anchor_coverage(anchors, boxes) == pytest.approx(2 / 3)
    assert anchor_coverage(anchors, boxes, iou=0.6) == pytest.approx(1 / 3)
    assert anchor_coverage(anchors, torch.zeros(0, 4)) == 1.0


def test_no_map_holds_anchors_wider_than_eight_of_its_pixels():
    boxes = (tall_boxes() * torch.tensor([2.0, 1.0, 2.0, 1.0])).clamp(max=1.0)  # 0.2-0.4 wide, 0.4-0.8 high
    maps = feature_map_sizes(256, 256)  # 32, 16, 8, 4 and 1 pixels across
    sizes, _ = fit_anchors(boxes, maps)
    assert all(max(row) <= MAX_STRIDES / hw[1] for row, hw in zip(sizes, maps))
    assert max(sizes[0]) < 0.3 < max(max(row) for row in sizes[1:])  # the large ones sit on coarser maps
