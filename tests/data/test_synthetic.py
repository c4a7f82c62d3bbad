"""ssd.data.synthetic: the boxes are the drawn pixels, the sizes match the real data, the archive is reproducible."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ssd.data.synthetic import MAX_ASPECT, MAX_SIDE, MIN_ASPECT, MIN_SIDE, _banana, _round_fruit, generate_archive, \
    render_image


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@pytest.mark.parametrize("seed", range(12))
def test_boxes_are_the_tight_boxes_of_the_drawn_pixels(seed):
    out = render_image(np.random.default_rng(seed), 256, ["banana", "apple"], max_objects=3)
    drawn = (out.image != out.under).any(-1)                  # exactly the objects' pixels
    inside = np.zeros_like(drawn)
    for cls, x1, y1, x2, y2 in out.boxes:
        assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256 and cls in (0, 1)
        own = np.zeros_like(drawn)
        own[y1:y2, x1:x2] = drawn[y1:y2, x1:x2]
        assert tight_box(own) == (x1, y1, x2, y2)
        inside[y1:y2, x1:x2] = True
    assert not (drawn & ~inside).any()                         # nothing drawn outside the boxes


def test_box_statistics_match_the_real_dataset():
    boxes = [b for i in range(60) for b in render_image(np.random.default_rng([7, i])).boxes]
    w = np.array([b[3] - b[1] for b in boxes])
    h = np.array([b[4] - b[2] for b in boxes])
    assert MIN_SIDE <= w.min() and w.max() <= MAX_SIDE and MIN_SIDE <= h.min() and h.max() <= MAX_SIDE
    assert MIN_ASPECT <= (w / h).min() and (w / h).max() <= MAX_ASPECT
    assert 40 <= w.mean() <= 62 and 40 <= h.mean() <= 62     # real: means 51 and 50
    x1 = np.array([b[1] for b in boxes])
    assert x1.min() < 40 and x1.max() > 150                   # anywhere in the image, not centred


def test_bananas_are_yellow_crescents_and_the_second_class_differs():
    rng = np.random.default_rng(3)
    bananas = [b for _ in range(300) if (b := _banana(rng)) is not None][:40]
    fruits = [f for _ in range(30) if (f := _round_fruit(rng, 1)) is not None][:10]
    assert len(bananas) == 40 and len(fruits) == 10
    fill = np.mean([m.mean() for m, _ in bananas])
    assert fill < 0.6 < np.mean([m.mean() for m, _ in fruits])  # a crescent covers little of its box
    colour = np.mean([c[m].mean(0) for m, c in bananas], axis=0)
    assert colour[0] > 0.5 and colour[1] > 0.4 and colour[2] < 0.3  # yellow: red and green, little blue
    tips = [c[m] for m, c in bananas]
    assert all((px.sum(1) < 1.0).any() for px in tips)          # every banana has dark (brown) pixels


def test_archive_layout_labels_and_reproducible_bytes(tmp_path):
    kw = dict(seed=5, train=4, val=2, max_objects=2, classes=["banana", "apple"])
    generate_archive(tmp_path / "a.zip", **kw)
    generate_archive(tmp_path / "b.zip", **kw)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        names = set(zf.namelist())
        for split, n, split_no in (("bananas_train", 4, 0), ("bananas_val", 2, 1)):
            assert {f"banana-detection/{split}/images/{i}.png" for i in range(n)} <= names
            table = pd.read_csv(io.BytesIO(zf.read(f"banana-detection/{split}/label.csv")))
            assert list(table.columns) == ["img_name", "label", "xmin", "ymin", "xmax", "ymax"]
            for i in range(n):
                img = Image.open(io.BytesIO(zf.read(f"banana-detection/{split}/images/{i}.png")))
                assert img.mode == "RGB" and img.size == (256, 256)
                expected = render_image(np.random.default_rng([5, split_no, i]), 256, ["banana", "apple"], 2)
                assert np.array_equal(np.asarray(img), expected.image)
                rows = table[table.img_name == f"{i}.png"][["label", "xmin", "ymin", "xmax", "ymax"]]
                assert [tuple(r) for r in rows.itertuples(index=False)] == expected.boxes


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_objects"):
        generate_archive(tmp_path / "x.zip", train=1, val=1, max_objects=0)
