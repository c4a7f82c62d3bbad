"""Label files in the banana layout, and where a dataset's splits are.

A split is a folder holding ``images/`` and ``label.csv`` (``labels.csv`` is accepted too) with
the header ``img_name,label,xmin,ymin,xmax,ymax``: one row per box, pixel corner coordinates,
``label`` a class index or a class name, boxes in the displayed frame of the image (EXIF orientation
applied, as viewers and annotation tools show it).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from ssd.data.layout import IMAGES_DIR, LABEL_COLUMNS, LABEL_FILE, SPLIT_DIRS

LABEL_FILES = (LABEL_FILE, "labels.csv")
SPLITS = {"train": (SPLIT_DIRS["train"], "train"), "val": (SPLIT_DIRS["val"], "val", "test")}


def find_split(root: str | Path, split: str) -> Path:
    """The folder of ``split`` ("train" or "val") under a dataset root, or the root itself if it is one."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if (root / IMAGES_DIR).is_dir():
        return root
    for name in SPLITS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"no {split!r} split in {root} (looked for {', '.join(SPLITS.get(split, (split,)))})")


def label_file(split_dir: Path) -> Path:
    for name in LABEL_FILES:
        if (split_dir / name).is_file():
            return split_dir / name
    raise FileNotFoundError(f"no label file in {split_dir} (expected {' or '.join(LABEL_FILES)})")


def read_labels(path: str | Path) -> pd.DataFrame:
    """The label table; every problem (missing, empty, not UTF-8, malformed CSV, missing column) is a
    one-line error naming the file, and the line where it is known."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM, as spreadsheet programs write, is not part of the header
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         f"save the file as UTF-8 CSV") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file (expected the header {','.join(LABEL_COLUMNS)} and one row per box)")
    try:
        table = pd.read_csv(io.StringIO(text), dtype={LABEL_COLUMNS[0]: str, LABEL_COLUMNS[1]: str})
    except (pd.errors.ParserError, ValueError) as exc:  # e.g. "Expected 6 fields in line 3, saw 7"
        raise ValueError(f"{path}: malformed CSV ({' '.join(str(exc).split())})") from None
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (header must be {','.join(LABEL_COLUMNS)})")
    return table


def class_index(value: str, classes: Sequence[str], where: str) -> int:
    """A label cell as a class index: an integer in range or one of the class names."""
    value = str(value).strip()
    if value in classes:
        return list(classes).index(value)
    try:
        index = int(float(value))
    except ValueError:
        raise ValueError(f"{where}: unknown class {value!r} (classes: {', '.join(classes)})") from None
    if not 0 <= index < len(classes) or float(value) != index:
        raise ValueError(f"{where}: class {value!r} out of range 0..{len(classes) - 1}")
    return index


def box_values(row: object, where: str) -> list[float]:
    """A row's ``xmin, ymin, xmax, ymax`` as finite floats, or ``ValueError`` naming the row."""
    values = []
    for column in LABEL_COLUMNS[2:]:
        cell = getattr(row, column)
        try:
            value = float(cell)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{where}: {column} {cell!r} is not a finite number")
        values.append(value)
    return values
