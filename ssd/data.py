"""Reading detection datasets in the banana layout.

A split is a folder holding ``images/`` and ``label.csv`` (``labels.csv`` is accepted too) with
the header ``img_name,label,xmin,ymin,xmax,ymax``: one row per box, pixel corner coordinates,
``label`` a class index or a class name. Images may be any size and mode (PIL decodes by content,
not by extension); they are converted to RGB and resized to a square ``image_size``, and boxes are
normalised to [0, 1] by the original size, so they survive the resize unchanged.

Images stay in memory as one ``uint8`` tensor (1000 banana images take 197 MB); they become float
(0..255, unnormalised, as in the seed) only on the way into the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .layout import IMAGES_DIR, LABEL_COLUMNS, LABEL_FILE, SPLIT_DIRS

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
    """The label table, with a clear error for a missing file or column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    table = pd.read_csv(path, dtype={LABEL_COLUMNS[0]: str, LABEL_COLUMNS[1]: str})
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


def load_image(path: Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``uint8 Tensor[3, S, S]`` and the original ``(width, height)``."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read as an image ({exc})") from None
    size = img.size
    if size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous(), size


def read_split(split_dir: str | Path, image_size: int = 256, classes: Sequence[str] = ("banana",)
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split.

    Returns:
        ``images uint8 Tensor[N, 3, S, S]``, ``labels float32 Tensor[N, M, 5]`` rows
        ``(class, x1, y1, x2, y2)`` in [0, 1] padded with rows of -1, and the image names.
    """
    split_dir = Path(split_dir)
    table = read_labels(label_file(split_dir))
    names = list(dict.fromkeys(table[LABEL_COLUMNS[0]]))
    rows_by_image: dict[str, list[list[float]]] = {name: [] for name in names}
    for row_no, row in enumerate(table.itertuples(index=False), start=2):  # row 1 is the header
        where = f"{label_file(split_dir)} row {row_no}"
        cls = class_index(row.label, classes, where)
        rows_by_image[row.img_name].append([cls, row.xmin, row.ymin, row.xmax, row.ymax])

    images = torch.empty(len(names), 3, image_size, image_size, dtype=torch.uint8)
    max_objects = max((len(r) for r in rows_by_image.values()), default=0)
    labels = torch.full((len(names), max_objects, 5), -1.0)
    for i, name in enumerate(names):
        path = split_dir / IMAGES_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image listed in the label file is missing")
        images[i], (width, height) = load_image(path, image_size)
        boxes = torch.tensor(rows_by_image[name], dtype=torch.float64)
        boxes[:, 1:] /= torch.tensor([width, height, width, height], dtype=torch.float64)
        labels[i, : len(boxes)] = boxes.float()
    return images, labels, names


class DetectionDataset(Dataset):
    """A split held in memory. Items are ``(uint8 Tensor[3, S, S], float Tensor[M, 5])``."""

    def __init__(self, split_dir: str | Path, image_size: int = 256, classes: Sequence[str] = ("banana",)):
        self.split_dir = Path(split_dir)
        self.classes = list(classes)
        self.images, self.labels, self.names = read_split(split_dir, image_size, classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One gather per batch instead of a Python collate over items.
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx]


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def make_loader(dataset: DetectionDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                rank: int = 0, world_size: int = 1, num_workers: int = 0, drop_last: bool = False,
                pin_memory: bool = False) -> DataLoader:
    """A loader whose order depends only on ``(seed, epoch)``; call ``loader.sampler.set_epoch(e)``.

    With ``world_size > 1`` each rank gets its own shard of every epoch, as ``DistributedSampler``
    gives; ``batch_size`` is the per-process batch.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=_keep_batch, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def load_dataset(root: str | Path, split: str, image_size: int = 256,
                 classes: Sequence[str] = ("banana",)) -> DetectionDataset:
    """The ``split`` ("train" or "val") of a dataset root such as ``data/raw/banana-detection``."""
    return DetectionDataset(find_split(root, split), image_size, classes)
