"""Validate a dataset in the banana layout before anything trains on it.

``validate(root, image_size, classes)`` decodes every image of both splits and checks every label
row: the header, numeric and finite coordinates, ``0 <= xmin < xmax <= width`` (and the same for y),
the class (an index or a name of ``data.classes``), that the image exists in the split's ``images/``
(an absolute or ``..`` name is refused as naming a path outside it), no duplicate rows, no image
without a label, and the label file's limits (:class:`LabelLimits`: boxes per image, line length,
rows). It collects EVERY problem (``"<file> row N: ..."``, N the line number in the csv, the header
being line 1) and raises one ``ValueError`` listing the first :data:`LISTED_PROBLEMS` and counting
the rest. Only a clean dataset gets ``data/reports/validation.json`` (counts, box statistics,
``problems: []``) and ``data/reports/samples.png`` (images with their boxes); a failed check removes
any stale report, so downstream DVC stages never see one.
"""
from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS, open_image, read_rgb
from ssd.data.labels import (LabelLimits, class_index, crowded_images, find_split, label_file, name_problem,
                             read_labels, shorten)
from ssd.data.layout import IMAGES_DIR, LABEL_COLUMNS, dataset_root
from ssd.util.files import atomic_dir, atomic_write_json

SPLITS = ("train", "val")
REPORT, SAMPLES = "validation.json", "samples.png"
COORDS = ("xmin", "ymin", "xmax", "ymax")
LISTED_PROBLEMS = 50  # a million bad rows are summarised, not printed
PARALLEL_CHECK_MIN_IMAGES = 64  # fewer images are decoded in this process: a pool costs more than it saves


class Problems:
    """The problems found so far: all counted, the first :data:`LISTED_PROBLEMS` kept (a million bad
    rows must not hold a million messages)."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.count = 0

    def append(self, problem: str) -> None:
        self.count += 1
        if len(self.listed) < LISTED_PROBLEMS:
            self.listed.append(problem)

    def extend(self, problems: Iterable[str]) -> None:
        for problem in problems:
            self.append(problem)

    def __len__(self) -> int:
        return self.count


def _probe(job: tuple[Path, int | None, int]) -> tuple[str, tuple[int, int] | None, list[str]]:
    """Decode one image as the reader does: ``(name, displayed size or None, problems)``."""
    path, image_size, max_pixels = job
    try:
        # A full decode: truncated or corrupt data fail here, not later in training.
        img = open_image(path, max_pixels)
    except ValueError as exc:
        return path.name, None, [str(exc)]
    problems = []
    if image_size is not None and img.mode != "RGB":
        problems.append(f"{path}: mode {img.mode}, expected RGB")
    if image_size is not None and img.size != (image_size, image_size):
        problems.append(f"{path}: size {img.width}x{img.height}, expected {image_size}x{image_size} "
                        f"(data.image_size)")
    return path.name, img.size, problems


def check_workers() -> int:
    """Processes that decode images for validation: every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decode_images(image_dir: Path, image_size: int | None, problems: Problems,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, workers: int = 1) -> dict[str, tuple[int, int]]:
    """Decode every file in ``image_dir`` as the reader does; returns ``{name: (width, height)}``
    of the readable ones, the size as displayed (EXIF orientation applied): boxes are checked against it.

    With ``image_size`` None any size and mode pass (the reader converts to RGB and resizes).
    ``workers`` > 1 decodes in a process pool, a chunk of files at a time, in the files' order (the
    problems come out as from one process); memory holds sizes and problems, never images.
    """
    jobs = [(p, image_size, max_pixels) for p in sorted(p for p in image_dir.iterdir() if p.is_file())]
    if workers > 1 and len(jobs) >= PARALLEL_CHECK_MIN_IMAGES:
        with ProcessPoolExecutor(workers) as pool:
            return _collect(pool.map(_probe, jobs, chunksize=64), problems)
    return _collect(map(_probe, jobs), problems)


def _collect(results: Iterable[tuple[str, tuple[int, int] | None, list[str]]],
             problems: Problems) -> dict[str, tuple[int, int]]:
    sizes = {}
    for name, size, found in results:
        problems.extend(found)
        if size is not None:
            sizes[name] = size
    return sizes


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        return {}
    return {"min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "mean": round(float(a.mean()), 4)}


Box = tuple[int, float, float, float, float]  # class index, xmin, ymin, xmax, ymax


def _box_problems(row: Any, values: list[float], size: tuple[int, int]) -> list[str]:
    """What is wrong with a row's coordinates ``values`` in an image of ``size`` (width, height)."""
    non_finite = [f"{c}={shorten(getattr(row, c))}" for c, v in zip(COORDS, values) if not math.isfinite(v)]
    if non_finite:
        return [f"not finite numbers: {', '.join(non_finite)}"]
    x1, y1, x2, y2 = values
    width, height = size
    bad = []
    if not 0 <= x1 < x2 <= width:
        bad.append(f"x range {x1:g}..{x2:g} is not 0 <= xmin < xmax <= {width}")
    if not 0 <= y1 < y2 <= height:
        bad.append(f"y range {y1:g}..{y2:g} is not 0 <= ymin < ymax <= {height}")
    return bad


def _row_problems(row: Any, values: list[float], where: str, image_dir: Path, files: set[str],
                  sizes: dict[str, tuple[int, int]], image_size: int,
                  classes: Sequence[str]) -> tuple[list[str], int | None]:
    """Everything wrong with one label row (all of it, not the first), and its class index."""
    name = row.img_name
    problem = name_problem(name, image_dir)
    bad = [problem] if problem else []
    if not problem and name not in files:
        shown = name if len(name) <= 120 else shorten(name)  # a cell is quoted, never whole
        bad.append(f"image {image_dir}{os.sep}{shown} does not exist")
    cls = None
    try:
        cls = class_index(row.label, classes, where)
    except ValueError as exc:
        bad.append(str(exc).removeprefix(f"{where}: "))
    # An unreadable image has no size of its own: its boxes are checked against the nominal one.
    size = sizes.get(name, (image_size, image_size)) if isinstance(name, str) else (image_size,) * 2
    return bad + _box_problems(row, values, size), cls


def _first_equal_rows(table: pd.DataFrame) -> np.ndarray:
    """For each row, the index of the first row equal to it as text (itself when it is the first)."""
    if table.empty:
        return np.zeros(0, dtype=np.int64)
    text = table.astype(str)
    group = text.groupby(list(text.columns), sort=False, dropna=False).ngroup().to_numpy()
    _, first = np.unique(group, return_index=True)  # groups are numbered in order of first appearance
    return first[group]


def _check_rows(table: pd.DataFrame, labels_path: Path, image_dir: Path, files: set[str],
                sizes: dict[str, tuple[int, int]], image_size: int, classes: Sequence[str],
                problems: Problems) -> dict[str, list[Box]]:
    """Check every label row, appending to ``problems``; returns the good boxes per image."""
    numbers = np.stack([pd.to_numeric(table[c], errors="coerce").to_numpy(np.float64) for c in COORDS], axis=1)
    first_of = _first_equal_rows(table)
    boxes: dict[str, list[Box]] = {}
    for i, row in enumerate(table.itertuples(index=False)):
        where = f"{labels_path} row {i + 2}"  # the line in the csv: the header is line 1
        if first_of[i] != i:
            problems.append(f"{where}: duplicate of row {first_of[i] + 2}")
            continue
        values = list(numbers[i])
        bad, cls = _row_problems(row, values, where, image_dir, files, sizes, image_size, classes)
        if bad:
            problems.append(f"{where}: {'; '.join(bad)}")
        else:
            boxes.setdefault(row.img_name, []).append((cls, *values))
    return boxes


def _split_stats(files: set[str], table: pd.DataFrame, boxes: dict[str, list[Box]],
                 classes: Sequence[str]) -> dict[str, Any]:
    """The report's figures for one split, over its good boxes only."""
    flat = [b for bs in boxes.values() for b in bs]
    w = [b[3] - b[1] for b in flat]
    h = [b[4] - b[2] for b in flat]
    return {
        "images": len(files),
        "label_rows": len(table),
        "objects_per_image": _stats([len(bs) for bs in boxes.values()]),
        "classes": {classes[c]: sum(1 for b in flat if b[0] == c) for c in range(len(classes))},
        "box_width": _stats(w),
        "box_height": _stats(h),
        "box_aspect": _stats([a / b for a, b in zip(w, h)]),
        "box_x_range": [float(min(b[1] for b in flat)), float(max(b[3] for b in flat))] if flat else [],
        "box_y_range": [float(min(b[2] for b in flat)), float(max(b[4] for b in flat))] if flat else [],
    }


def check_split(split_dir: Path, image_size: int, classes: Sequence[str], problems: Problems,
                strict: bool = True, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                limits: LabelLimits = LabelLimits(), workers: int = 1) -> tuple[dict[str, Any], dict[str, list[Box]]]:
    """Check one split, appending to ``problems``; returns its statistics and the good boxes per image
    (``workers``: processes decoding its images, see :func:`_decode_images`)."""
    image_dir = split_dir / IMAGES_DIR
    if not image_dir.is_dir():
        problems.append(f"{image_dir}: images folder missing")
        return {}, {}
    sizes = _decode_images(image_dir, image_size if strict else None, problems, max_pixels, workers)
    files = {p.name for p in image_dir.iterdir() if p.is_file()}
    try:
        labels_path = label_file(split_dir)
        table = read_labels(labels_path, limits)
    except (OSError, ValueError) as exc:  # missing file, unparsable csv, missing column, over a limit
        problems.append(str(exc))
        return {}, {}
    if tuple(table.columns) != LABEL_COLUMNS:
        problems.append(f"{labels_path}: header {shorten(','.join(map(str, table.columns)), 200)}, "
                        f"expected {','.join(LABEL_COLUMNS)}")
    problems.extend(crowded_images(table, labels_path, limits.max_boxes_per_image))
    boxes = _check_rows(table, labels_path, image_dir, files, sizes, image_size, classes, problems)
    labelled = {n for n in table[LABEL_COLUMNS[0]] if isinstance(n, str)}
    problems.extend(f"{image_dir / n}: image has no label row in {labels_path}" for n in sorted(files - labelled))
    return _split_stats(files, table, boxes, classes), boxes


def sample_grid(split_dir: Path, boxes: dict[str, list], classes: Sequence[str], n: int = 16,
                columns: int = 4, size: int = 256) -> Image.Image:
    """The first ``n`` images of a split, each scaled to fit a ``size`` square, with their boxes
    and class names drawn on them."""
    names = list(boxes)[:n]
    tiles = []
    for name in names:
        tile = read_rgb(split_dir / IMAGES_DIR / name)  # displayed frame: the boxes are in it
        scale = size / max(tile.size)
        if scale != 1:
            tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))))
        draw = ImageDraw.Draw(tile)
        for cls, x1, y1, x2, y2 in boxes[name]:
            x1, y1, x2, y2 = (v * scale for v in (x1, y1, x2, y2))
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(0, 255, 255), width=2)
            draw.text((x1 + 2, max(0, y1 - 11)), classes[cls], fill=(0, 255, 255))
        tiles.append(tile)
    rows = max(1, math.ceil(len(tiles) / columns))
    grid = Image.new("RGB", (columns * size, rows * size), (32, 32, 32))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * size, (i // columns) * size))
    return grid


def summary(root: Path, problems: Problems) -> str:
    """``N problem(s) in ROOT:`` and the first :data:`LISTED_PROBLEMS` problems, one per line, then how
    many more there are."""
    more = len(problems) - len(problems.listed)
    return (f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems.listed)
            + (f"\n  ... and {more} more problems" if more > 0 else ""))


def validate(root: str | Path, image_size: int = 256, classes: Sequence[str] = ("banana",), strict: bool = True,
             max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, limits: LabelLimits = LabelLimits(),
             workers: int | None = None) -> tuple[dict, Image.Image]:
    """Check both splits; returns the report and the sample grid, or raises ``ValueError`` listing all problems.

    ``strict``: every image must be RGB and ``image_size`` square (the banana data are); otherwise any
    size and mode pass, as photos come, and boxes are checked against each image's own size as
    displayed (EXIF orientation applied). ``max_pixels``: larger images are problems; ``limits``: the
    label files'. ``workers``: processes decoding the images (None: :func:`check_workers`); the rate
    (images/second) of a clean dataset goes to stderr.
    """
    workers = check_workers() if workers is None else workers
    started = time.perf_counter()
    root = dataset_root(root)
    classes = list(classes)
    problems = Problems()
    report: dict[str, Any] = {"data": str(root), "image_size": image_size, "classes": classes, "splits": {}}
    grid = None
    for split in SPLITS:
        try:
            split_dir = find_split(root, split)
        except FileNotFoundError as exc:
            problems.append(str(exc))
            continue
        report["splits"][split], boxes = check_split(split_dir, image_size, classes, problems, strict, max_pixels,
                                                     limits, workers)
        if split == "train":
            grid = (split_dir, boxes)
    if problems:  # the refusal stays one line: no rate before it
        raise ValueError(summary(root, problems))
    images = sum(split.get("images", 0) for split in report["splits"].values())
    seconds = time.perf_counter() - started
    print(f"validate: {images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s, "
          f"{workers} process(es))", file=sys.stderr)
    report["problems"] = []
    return report, sample_grid(*grid, classes)


def run_validation(root: str | Path, out: str | Path, image_size: int, classes: Sequence[str],
                   strict: bool = True, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   limits: LabelLimits = LabelLimits()) -> dict[str, Any]:
    """Validate and write ``out/validation.json`` + ``out/samples.png`` (together, atomically)."""
    out = Path(out)
    try:
        report, grid = validate(root, image_size, classes, strict, max_pixels, limits)
    except ValueError:
        for name in (REPORT, SAMPLES):  # a stale "valid" report must not outlive invalid data
            (out / name).unlink(missing_ok=True)
        raise
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a report folder is not
        atomic_write_json(tmp / REPORT, report)
        grid.save(tmp / SAMPLES)
    return report
