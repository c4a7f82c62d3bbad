"""The ONNX check's row matching (``ssd.engine.onnx_export.unmatched_rows``): order-free, class- and
tolerance-strict. The whole export against onnxruntime: tests/pipeline/test_consumers.py and
tests/pipeline/test_onnx_consumer.py."""
import torch

from ssd.engine.onnx_export import ATOL, unmatched_rows

# (class_id, score, x1, y1, x2, y2); rows 1 and 2 tie on score, as equal anchors on a flat background do
ROWS = torch.tensor([[0, 0.9, 0.1, 0.1, 0.3, 0.3], [0, 0.47085461, 0.5, 0.5, 0.7, 0.7],
                     [0, 0.47085461, 0.2, 0.6, 0.4, 0.8], [1, 0.2, 0.0, 0.0, 0.5, 0.5]])


def test_tied_rows_in_another_order_match():
    """A trained model's tied rows came from onnxruntime in the other order: the check once failed
    every registration of a trained model ("detections differ ... by up to 0.45")."""
    swapped = ROWS[[0, 2, 1, 3]]
    assert unmatched_rows(ROWS, swapped) == 0
    assert unmatched_rows(ROWS, swapped + torch.tensor([0, 0.9 * ATOL, 0, 0, 0, -0.9 * ATOL])) == 0


def test_a_row_off_by_more_than_the_tolerance_or_of_another_class_does_not():
    moved = ROWS.clone()
    moved[1, 2] += 2 * ATOL
    assert unmatched_rows(ROWS, moved) == 1
    relabelled = ROWS.clone()
    relabelled[3, 0] = 0
    assert unmatched_rows(ROWS, relabelled) == 1
    assert unmatched_rows(ROWS, ROWS[[0, 1, 1, 3]]) == 1  # each row of theirs is used once
