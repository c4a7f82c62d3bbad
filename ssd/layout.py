"""The dataset layout on disk (the d2l banana archive's), defined once::

    banana-detection/                    DATASET_DIR (under data/raw)
        bananas_train/ bananas_val/      SPLIT_DIRS
            images/0.png ...             IMAGES_DIR
            label.csv                    LABEL_FILE, header LABEL_COLUMNS

Readers, the fetch stage, the synthetic generator and the tests' fixtures all spell it from here.
"""
from __future__ import annotations

from pathlib import Path

DATASET_DIR = "banana-detection"
SPLIT_DIRS = {"train": "bananas_train", "val": "bananas_val"}
IMAGES_DIR = "images"
LABEL_FILE = "label.csv"
LABEL_COLUMNS = ("img_name", "label", "xmin", "ymin", "xmax", "ymax")  # one row per box, pixel corners
LABEL_HEADER = ",".join(LABEL_COLUMNS)


def dataset_root(path: str | Path) -> Path:
    """``data/raw`` and ``data/raw/banana-detection`` both name the dataset: the latter."""
    path = Path(path)
    return path / DATASET_DIR if (path / DATASET_DIR).is_dir() else path
