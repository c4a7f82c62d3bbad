"""Dataset folders as a source, and the banana layout an unpacked dataset must have.

A source folder holds the banana layout (``[banana-detection/]bananas_train`` and ``bananas_val``)
or ``train/`` and ``val/``, each split with ``images/`` and ``label.csv`` (or ``labels.csv``); it is
copied into the banana layout, so every later stage sees one layout. It never leads outside itself:
a symlink out of it refuses the whole folder (``ssd.data.confine``).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ssd.data.confine import open_inside, source_files
from ssd.data.labels import LABEL_FILES, label_file
from ssd.data.layout import DATASET_DIR, IMAGES_DIR, LABEL_FILE, SPLIT_DIRS

_NEWLINE = re.compile(rb"\r\n|\r|\n")


def folder_splits(root: Path) -> dict[str, Path]:
    """The train and val split folders of a dataset folder: the banana layout (``bananas_train`` and
    ``bananas_val``, directly or under ``banana-detection/``) or ``train/`` and ``val/``, each split with
    ``images/`` and ``label.csv`` (or ``labels.csv``). ``ValueError`` naming what is missing otherwise."""
    base = root / DATASET_DIR if (root / DATASET_DIR).is_dir() else root
    layouts = {"banana layout": {split: base / d for split, d in SPLIT_DIRS.items()},
               "train/val layout": {"train": root / "train", "val": root / "val"}}
    missing: dict[str, list[str]] = {}
    for name, splits in layouts.items():
        gaps = [d / IMAGES_DIR for d in splits.values() if not (d / IMAGES_DIR).is_dir()]
        gaps += [d / LABEL_FILE for d in splits.values() if not any((d / f).is_file() for f in LABEL_FILES)]
        if not gaps:
            return splits
        missing[name] = [p.relative_to(root).as_posix() for p in gaps]
    raise ValueError(f"source folder {root} has neither dataset layout (each split needs images/ and label.csv): "
                     + "; ".join(f"{name}: missing {', '.join(gaps)}" for name, gaps in missing.items()))


def _copy_inside(path: Path, root: Path, target: Path) -> None:
    with open_inside(path, root) as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out)


def copy_folder(root: Path, dest: Path) -> int:
    """Copy the dataset folder ``root`` (:func:`folder_splits`) into ``dest`` in the banana layout
    (``dest/bananas_train``, ``dest/bananas_val``); returns the number of files copied. Hidden files
    (``.DS_Store`` and the like) and subfolders of ``images/`` are left out: they are never images.

    Every symlink in ``root`` must resolve inside it (``ValueError`` naming the first that does not,
    before anything is copied); a link inside is copied as the plain file it points to."""
    root = Path(os.path.realpath(root))
    list(source_files(root))  # the whole folder is checked before a byte is copied
    files = 0
    for split, src in folder_splits(root).items():
        name = SPLIT_DIRS[split]
        (dest / name / IMAGES_DIR).mkdir(parents=True)
        _copy_inside(label_file(src), root, dest / name / LABEL_FILE)
        for path in sorted((src / IMAGES_DIR).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                _copy_inside(path, root, dest / name / IMAGES_DIR / path.name)
                files += 1
        files += 1
    return files


def _count_rows(path: Path, chunk: int = 1 << 20) -> int:
    """Non-blank lines after the header, split as ``bytes.splitlines`` splits, read in chunks: a
    label file of one huge line costs one chunk of memory, not the line."""
    rows, line_no, has_text, carry = 0, 0, False, b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            block, carry = carry + block, b""
            if block.endswith(b"\r"):  # maybe the first half of a \r\n split between chunks
                block, carry = block[:-1], b"\r"
            for i, piece in enumerate(_NEWLINE.split(block)):
                if i:  # a line ended before this piece
                    rows, line_no, has_text = rows + (line_no > 0 and has_text), line_no + 1, False
                has_text = has_text or bool(piece.strip())
    return rows + (line_no > 0 and has_text)


def check_layout(root: Path) -> dict[str, dict[str, int]]:
    """File counts per split of the dataset unpacked under ``root``; ``ValueError`` unless the banana
    layout is there."""
    counts = {}
    for split in SPLIT_DIRS.values():
        d = root / DATASET_DIR / split
        if not (d / IMAGES_DIR).is_dir() or not (d / LABEL_FILE).is_file():
            raise ValueError(f"archive does not have the banana layout: missing {DATASET_DIR}/{split}/{IMAGES_DIR} "
                             f"or {DATASET_DIR}/{split}/{LABEL_FILE}")
        rows = _count_rows(d / LABEL_FILE)
        counts[split] = {"images": sum(1 for p in (d / IMAGES_DIR).iterdir() if p.is_file()), "label_rows": rows}
    return counts
