"""Reading detection datasets in the banana layout into memory, and loading them in batches.

The label files and split folders: ``ssd.data.labels``; the image reader: ``ssd.data.images``.
Images are resized to a square ``image_size``; boxes are normalised to [0, 1] by the displayed size,
so they survive the resize.

Images stay in memory as one ``uint8`` tensor (1000 banana images take 197 MB); they become float
(0..255, unnormalised, as in the seed) only on the way into the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS, read_image
from ssd.data.labels import (LabelLimits, box_values, class_index, crowded_images, find_split, image_file,
                             label_file, read_labels)
from ssd.data.layout import IMAGES_DIR


def _boxes_by_image(table: pd.DataFrame, labels_path: Path, image_dir: Path, classes: Sequence[str],
                    limits: LabelLimits) -> dict[str, list[list[float]]]:
    """``{img_name: [[class, x1, y1, x2, y2], ...]}`` in pixels, in the label file's order; the first
    problem (over a limit, a name outside ``image_dir``, a bad class or number) raises, in one line."""
    crowded = crowded_images(table, labels_path, limits.max_boxes_per_image)
    if crowded:  # before anything is allocated per box
        raise ValueError(crowded[0] + (f" (and {len(crowded) - 1} more such images)" if len(crowded) > 1 else ""))
    rows_by_image: dict[str, list[list[float]]] = {}
    for row_no, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        where = f"{labels_path} row {row_no}"
        image_file(image_dir, row.img_name, where)
        box = box_values(row, where)
        rows_by_image.setdefault(row.img_name, []).append([class_index(row.label, classes, where), *box])
    return rows_by_image


def read_split(split_dir: str | Path, image_size: int = 256, classes: Sequence[str] = ("banana",),
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               limits: LabelLimits = LabelLimits()) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split (``ssd validate`` checks it in full first; this refuses what it cannot read, and
    what is over ``limits`` or names a file outside the split's ``images/``).

    Returns:
        ``images uint8 Tensor[N, 3, S, S]``, ``labels float32 Tensor[N, M, 5]`` rows
        ``(class, x1, y1, x2, y2)`` in [0, 1] of the displayed image, padded with rows of -1, and
        the image names.
    """
    split_dir = Path(split_dir)
    labels_path = label_file(split_dir)
    image_dir = split_dir / IMAGES_DIR
    rows_by_image = _boxes_by_image(read_labels(labels_path, limits), labels_path, image_dir, classes, limits)
    names = list(rows_by_image)

    images = torch.empty(len(names), 3, image_size, image_size, dtype=torch.uint8)
    max_objects = max((len(r) for r in rows_by_image.values()), default=0)
    labels = torch.full((len(names), max_objects, 5), -1.0)
    for i, name in enumerate(names):
        path = image_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image listed in the label file is missing")
        images[i], (width, height) = read_image(path, image_size, max_pixels)
        boxes = torch.tensor(rows_by_image[name], dtype=torch.float64)
        boxes[:, 1:] /= torch.tensor([width, height, width, height], dtype=torch.float64)
        labels[i, : len(boxes)] = boxes.float()
    return images, labels, names


class DetectionDataset(Dataset):
    """A split held in memory. Items are ``(uint8 Tensor[3, S, S], float Tensor[M, 5])``."""

    def __init__(self, split_dir: str | Path, image_size: int = 256, classes: Sequence[str] = ("banana",),
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, limits: LabelLimits = LabelLimits()):
        self.split_dir = Path(split_dir)
        self.classes = list(classes)
        self.images, self.labels, self.names = read_split(split_dir, image_size, classes, max_pixels, limits)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One gather per batch instead of a Python collate over items, where the split lives.
        idx = torch.as_tensor(indices, device=self.images.device)
        return self.images[idx], self.labels[idx]

    def to(self, device: torch.device) -> "DetectionDataset":
        """Keep the split on ``device``: batches are then gathered there, with no copy from the host."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self


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


def load_dataset(root: str | Path, split: str, image_size: int = 256, classes: Sequence[str] = ("banana",),
                 max_pixels: int | None = None, limits: LabelLimits = LabelLimits()) -> DetectionDataset:
    """The ``split`` ("train" or "val") of a dataset root such as ``data/raw/banana-detection``.

    ``max_pixels``: ``data.max_image_pixels`` (None: the default, 64 megapixels); ``limits``: the
    label file's (``LabelLimits.of(data)``; default: ``params.yaml``'s defaults).
    """
    return DetectionDataset(find_split(root, split), image_size, classes,
                            int(max_pixels) if max_pixels else DEFAULT_MAX_IMAGE_PIXELS, limits)
