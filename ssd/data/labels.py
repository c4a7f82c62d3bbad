"""Label files in the banana layout, and where a dataset's splits are.

A split is a folder holding ``images/`` and ``label.csv`` (``labels.csv`` is accepted too) with
the header ``img_name,label,xmin,ymin,xmax,ymax``: one row per box, pixel corner coordinates,
``label`` a class index or a class name, boxes in the displayed frame of the image (EXIF orientation
applied, as viewers and annotation tools show it).

A label file is bounded (:class:`LabelLimits`: ``data.max_label_line_bytes``, ``data.max_label_rows``,
``data.max_boxes_per_image``) before pandas sees it: its lines are measured while it is read in
chunks, so a 200 MB line or a file of a billion rows is refused in one line, holding one chunk.
"""
from __future__ import annotations

import codecs
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import pandas as pd

from ssd.data.confine import outside_images
from ssd.data.layout import IMAGES_DIR, LABEL_COLUMNS, LABEL_FILE, SPLIT_DIRS
from ssd.util.settings import DataSettings

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


@dataclass(frozen=True)
class LabelLimits:
    """What a label file may hold; the defaults are ``params.yaml``'s (a test compares them)."""
    max_boxes_per_image: int = 1000      # data.max_boxes_per_image
    max_label_line_bytes: int = 512      # data.max_label_line_bytes
    max_label_rows: int = 1_000_000      # data.max_label_rows (the header aside)

    @classmethod
    def of(cls, data: DataSettings) -> "LabelLimits":
        """The limits a stage's ``data`` settings give (the stage declares the three keys)."""
        return cls(data.max_boxes_per_image, data.max_label_line_bytes, data.max_label_rows)


def shorten(value: object, width: int = 120) -> str:
    """``repr(value)``, cut to about ``width`` characters: a message quotes a cell, never a whole line."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width - 12]}...({len(text)} chars)"


class _Upto(io.RawIOBase):
    """The first ``size`` bytes of an open file: pandas parses what was measured, however it grows."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.f.readinto(memoryview(buffer)[:self.left]) or 0
        self.left -= n
        return n


def _scan(f: BinaryIO, path: Path, limits: LabelLimits, chunk: int = 1 << 20) -> tuple[int, bool]:
    """Read an open label file to its end a chunk at a time, keeping nothing; ``ValueError`` at the first
    byte that is not UTF-8, the first line longer than ``max_label_line_bytes``, or once there are more
    than ``max_label_rows`` lines after the header (blank ones too). Returns its size and whether it
    holds anything but whitespace (and a BOM)."""
    decoder, size, text = codecs.getincrementaldecoder("utf-8")(), 0, False
    lines, line_bytes = 0, 0  # lines ended so far; bytes of the line being read
    while True:
        block, pending = f.read(chunk), decoder.getstate()[0]  # pending: a character cut by the last chunk
        try:
            decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            at = exc.start - len(pending)  # in this block; < 0: in the pending bytes (the same line)
            line = lines + 1 + (block.count(b"\n", 0, at) if at > 0 else 0)
            raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{(pending + block)[exc.start]:02x}); "
                             f"save the file as UTF-8 CSV") from None
        if not block:
            break
        text = text or bool((block.removeprefix(codecs.BOM_UTF8) if not size else block).strip())
        size, start = size + len(block), 0
        while start < len(block):
            end = block.find(b"\n", start)
            line_bytes += (len(block) if end < 0 else end) - start
            if line_bytes > limits.max_label_line_bytes:
                raise ValueError(f"{path} line {lines + 1}: longer than data.max_label_line_bytes = "
                                 f"{limits.max_label_line_bytes} bytes (a row is {','.join(LABEL_COLUMNS)})")
            if end < 0:
                break
            lines, line_bytes, start = lines + 1, 0, end + 1
            _check_rows(path, lines, limits)
    _check_rows(path, lines + (line_bytes > 0), limits)  # a last line without a newline
    return size, text


def _check_rows(path: Path, lines: int, limits: LabelLimits) -> None:
    if lines > limits.max_label_rows + 1:  # the header is not a row
        raise ValueError(f"{path}: more than data.max_label_rows = {limits.max_label_rows} rows")


def read_labels(path: str | Path, limits: LabelLimits = LabelLimits()) -> pd.DataFrame:
    """The label table; every problem (missing, empty, not UTF-8, malformed CSV, missing column, over a
    limit) is a one-line error naming the file, and the line where it is known.

    The file is measured (:func:`_scan`) before pandas parses it, from the same open file: memory is
    one chunk until the file is known to be within ``limits``, then pandas' table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    with open(path, "rb") as f:
        size, text = _scan(f, path, limits)
        if not text:
            raise ValueError(f"{path}: empty file (expected the header {','.join(LABEL_COLUMNS)} and one row per box)")
        f.seek(0)
        try:
            table = pd.read_csv(io.BufferedReader(_Upto(f, size)), encoding="utf-8-sig",  # a BOM, as spreadsheets
                                dtype={LABEL_COLUMNS[0]: str, LABEL_COLUMNS[1]: str})  # write, is no header
        except (pd.errors.ParserError, ValueError) as exc:  # e.g. "Expected 6 fields in line 3, saw 7"
            raise ValueError(f"{path}: malformed CSV ({' '.join(str(exc).split())[:200]})") from None
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
        raise ValueError(f"{where}: unknown class {shorten(value)} (classes: {', '.join(classes)})") from None
    if not 0 <= index < len(classes) or float(value) != index:
        raise ValueError(f"{where}: class {shorten(value)} out of range 0..{len(classes) - 1}")
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
            raise ValueError(f"{where}: {column} {shorten(cell)} is not a finite number")
        values.append(value)
    return values


def name_problem(name: object, image_dir: Path) -> str | None:
    """What is wrong with an ``img_name`` cell before the file is looked for: empty, or naming a path
    outside ``image_dir`` (absolute, or with a ``..`` part); None when nothing is."""
    if not isinstance(name, str) or not name.strip():
        return "empty img_name"
    if outside_images(name):
        return (f"img_name {shorten(name)} names a path outside {image_dir} (absolute or with '..'); "
                f"an img_name is a file in the split's {IMAGES_DIR}/ folder")
    return None


def image_file(image_dir: Path, name: object, where: str) -> Path:
    """The image an ``img_name`` cell names in ``image_dir``; ``ValueError`` ``"<where>: <problem>"``
    for a :func:`name_problem`."""
    problem = name_problem(name, image_dir)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return image_dir / name


def crowded_images(table: pd.DataFrame, path: Path, limit: int) -> list[str]:
    """One problem per image with more than ``limit`` boxes (rows) in the label ``table`` of ``path``."""
    names = table[LABEL_COLUMNS[0]]
    counts = names.value_counts()
    over = counts[counts > limit]
    if over.empty:
        return []
    crowded, first_row = set(over.index), {}
    for i, name in enumerate(names):
        if name in crowded:
            first_row.setdefault(name, i + 2)  # the line in the csv: the header is line 1
    return [f"{path}: image {shorten(name)} has {count} boxes (the first at row {first_row[name]}); "
            f"the limit is data.max_boxes_per_image = {limit}" for name, count in over.items()]
