"""Detection datasets in the banana layout, held in memory or decoded on demand, and their loaders.

The label files and split folders: ``ssd.data.labels``; the image reader: ``ssd.data.images``.
Images are resized to a square ``image_size``; boxes are normalised to [0, 1] by the displayed size,
so they survive the resize.

Two datasets give the same items and the same batches (``data.loader``, :func:`open_split`):

- :class:`DetectionDataset` (``memory``) decodes the split once, in parallel, into one ``uint8``
  tensor (1000 banana images take 197 MB per process); a batch is one gather, on the GPU if the
  split lives there. Fastest while the split fits.
- :class:`StreamDataset` (``stream``) holds only the label index; DataLoader workers decode and resize
  each image when a batch needs it, so memory does not grow with the split.

Either way labels are padded per batch (:func:`pad_labels`), to the batch's most crowded image, and
images become float (0..255, unnormalised, as in the seed) only on the way into the model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS, read_image
from ssd.data.labels import (LabelLimits, box_values, class_index, crowded_images, find_split, image_file,
                             label_file, read_labels)
from ssd.data.layout import IMAGES_DIR
from ssd.util.settings import LOADERS

MEMORY, STREAM = LOADERS[1], LOADERS[2]
# ``data.loader: auto`` holds a split in memory up to this many decoded bytes per process (5.4k
# images at 256 px), streams it above: docs/performance.md has the measurements behind it.
MEMORY_LOADER_MAX_BYTES = 1 << 30
PARALLEL_DECODE_MIN_IMAGES = 256  # below this, starting decode workers costs more than it saves


@dataclass(frozen=True)
class SplitIndex:
    """A split's labels without its images: ``names[i]`` has the pixel rows
    ``rows[starts[i]:starts[i + 1]]`` ``(class, x1, y1, x2, y2)``, float64, in the label file's order."""
    split_dir: Path
    names: list[str]
    rows: torch.Tensor
    starts: torch.Tensor

    @property
    def image_dir(self) -> Path:
        return self.split_dir / IMAGES_DIR

    def __len__(self) -> int:
        return len(self.names)

    def boxes(self, i: int) -> torch.Tensor:
        return self.rows[self.starts[i]:self.starts[i + 1]]

    def fingerprint(self, image_size: int) -> str:
        """Cheap identity of the data: names, label rows, image size (images follow from the fetch)."""
        digest = hashlib.sha1()
        digest.update("\n".join(self.names).encode())
        digest.update(self.rows.numpy().tobytes())
        digest.update(self.starts.numpy().tobytes())
        digest.update(str(image_size).encode())
        return digest.hexdigest()


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


def index_split(split_dir: str | Path, classes: Sequence[str] = ("banana",),
                limits: LabelLimits = LabelLimits()) -> SplitIndex:
    """Read a split's label file (no image is decoded); refuses what is over ``limits``, names a file
    outside the split's ``images/``, or names an image that is missing."""
    split_dir = Path(split_dir)
    labels_path = label_file(split_dir)
    image_dir = split_dir / IMAGES_DIR
    rows_by_image = _boxes_by_image(read_labels(labels_path, limits), labels_path, image_dir, classes, limits)
    for name in rows_by_image:
        if not (image_dir / name).is_file():
            raise FileNotFoundError(f"{image_dir / name}: image listed in the label file is missing")
    counts = torch.tensor([len(r) for r in rows_by_image.values()], dtype=torch.int64)
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), counts.cumsum(0)))
    flat = [row for rows in rows_by_image.values() for row in rows]
    rows = torch.tensor(flat, dtype=torch.float64).reshape(-1, 5)
    return SplitIndex(split_dir, list(rows_by_image), rows, starts)


def normalise(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel rows ``float64 Tensor[k, 5]`` of an image of displayed ``size`` (width, height) ->
    ``float32`` rows with corners in [0, 1]."""
    width, height = size
    out = boxes.clone()
    out[:, 1:] /= torch.tensor([width, height, width, height], dtype=torch.float64)
    return out.float()


def pad_labels(labels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image rows ``Tensor[k_i, 5]`` -> ``Tensor[B, max k_i, 5]``, padded with rows of -1."""
    out = torch.full((len(labels), max((len(x) for x in labels), default=0), 5), -1.0)
    for i, rows in enumerate(labels):
        out[i, :len(rows)] = rows
    return out


class StreamDataset(Dataset):
    """A split decoded on demand: memory is the label index, whatever the split's size.
    Items are ``(uint8 Tensor[3, S, S], float Tensor[k, 5])``; a batch is ``(images, pad_labels(...))``."""

    def __init__(self, index: SplitIndex, image_size: int = 256, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 classes: Sequence[str] = ("banana",)):
        self.index, self.image_size, self.max_pixels = index, image_size, max_pixels
        self.split_dir, self.names, self.classes = index.split_dir, index.names, list(classes)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, size = read_image(self.index.image_dir / self.names[idx], self.image_size, self.max_pixels)
        return image, normalise(self.index.boxes(idx), size)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[i] for i in indices]
        return torch.stack([image for image, _ in items]), pad_labels([labels for _, labels in items])

    def fingerprint(self) -> str:
        return self.index.fingerprint(self.image_size)


class DetectionDataset(Dataset):
    """A split held in memory: ``images uint8 Tensor[N, 3, S, S]``, and every label row in one
    ``float32 Tensor[R + 1, 5]`` (the last row is padding). Items as :class:`StreamDataset`'s."""

    def __init__(self, index: SplitIndex, image_size: int = 256, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 classes: Sequence[str] = ("banana",), workers: int | None = None):
        self.index, self.image_size = index, image_size
        self.split_dir, self.names, self.classes = index.split_dir, index.names, list(classes)
        stream = StreamDataset(index, image_size, max_pixels, classes)
        self.images = torch.empty(len(index), 3, image_size, image_size, dtype=torch.uint8)
        self.rows = torch.full((len(index.rows) + 1, 5), -1.0)
        self._labels: torch.Tensor | None = None
        counts = index.starts.diff()
        self._same_count = len(counts) > 0 and bool((counts == counts[0]).all())
        for i, image, labels in _decode(stream, workers):
            self.images[i] = image
            self.rows[index.starts[i]:index.starts[i + 1]] = labels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> torch.Tensor:
        """Every image's rows padded to the split's most crowded image, ``Tensor[N, M, 5]``: for
        scoring a whole split (made on first use); batches pad per batch."""
        if self._labels is None:
            self._labels = self._pad(torch.arange(len(self)))
        return self._labels

    def _pad(self, idx: torch.Tensor) -> torch.Tensor:
        if self._same_count:  # every image has k rows (the banana data: 1): one gather, as a view
            k = int(self.index.starts[1]) if len(self) else 0
            return self.rows[:-1].view(len(self), k, 5)[idx.to(self.rows.device)]
        starts, ends = self.index.starts[idx], self.index.starts[idx + 1]
        width = int((ends - starts).max()) if len(idx) else 0
        pos = starts[:, None] + torch.arange(width)
        pos = torch.where(pos < ends[:, None], pos, len(self.rows) - 1)  # the padding row
        return self.rows[pos.to(self.rows.device)]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.rows[self.index.starts[idx]:self.index.starts[idx + 1]]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One gather per batch instead of a Python collate over items, where the split lives.
        idx = torch.as_tensor(indices)
        return self.images[idx.to(self.images.device)], self._pad(idx)

    def to(self, device: torch.device) -> "DetectionDataset":
        """Keep the split on ``device``: batches are then gathered there, with no copy from the host."""
        self.images, self.rows, self._labels = self.images.to(device), self.rows.to(device), None
        return self

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.rows.nbytes

    def fingerprint(self) -> str:
        return self.index.fingerprint(self.image_size)


def _one(batch: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]) -> list:
    return batch


class _Numbered(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        try:
            return i, self.dataset[i]
        except (OSError, ValueError) as exc:  # raised in the parent as it is: one line, not a worker traceback
            return i, exc


def _decode(stream: StreamDataset, workers: int | None):
    """``(i, image, labels)`` for every item, in order; decoded by worker processes for large splits."""
    workers = pass_workers(len(stream), workers)
    # Its own generator: decoding must not draw from torch's global RNG (the model's weights do next).
    loader = DataLoader(_Numbered(stream), batch_size=32, num_workers=workers, collate_fn=_one,
                        generator=torch.Generator())
    for batch in loader:
        for i, item in batch:
            if isinstance(item, Exception):
                raise item
            yield i, *item


def decode_workers() -> int:
    """Worker processes this process may use: the cores it can run on, shared among the processes
    of its node (torchrun's ``LOCAL_WORLD_SIZE``), one left to the process itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))


def pass_workers(images: int, workers: int | None = None) -> int:
    """Decode workers for one pass over ``images`` in order (loading a split, scoring one):
    ``workers`` (None: :func:`decode_workers`), none below :data:`PARALLEL_DECODE_MIN_IMAGES`."""
    if images < PARALLEL_DECODE_MIN_IMAGES:
        return 0
    return decode_workers() if workers is None else workers


def resolve_loader(loader: str, images: int, image_size: int) -> str:
    """``data.loader`` as used: ``auto`` is ``memory`` while the decoded split is at most
    :data:`MEMORY_LOADER_MAX_BYTES`, else ``stream``."""
    if loader not in LOADERS:
        raise ValueError(f"data.loader {loader!r}: expected one of {', '.join(LOADERS)}")
    if loader != LOADERS[0]:
        return loader
    return MEMORY if images * 3 * image_size * image_size <= MEMORY_LOADER_MAX_BYTES else STREAM


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def make_loader(dataset: DetectionDataset | StreamDataset, batch_size: int, *, shuffle: bool = True,
                seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, drop_last: bool = False,
                pin_memory: bool = False, prefetch_factor: int | None = None) -> DataLoader:
    """A loader whose order depends only on ``(seed, epoch)``; call ``loader.sampler.set_epoch(e)``.

    With ``world_size > 1`` each rank gets its own shard of every epoch, as ``DistributedSampler``
    gives; ``batch_size`` is the per-process batch. Batches are ``(uint8 Tensor[B, 3, S, S],
    float Tensor[B, M, 5])``, ``M`` the batch's most boxes in one image.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=_keep_batch, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None)


def open_split(root: str | Path, split: str, image_size: int = 256, classes: Sequence[str] = ("banana",),
               max_pixels: int | None = None, limits: LabelLimits = LabelLimits(),
               loader: str = MEMORY) -> DetectionDataset | StreamDataset:
    """The ``split`` ("train" or "val") of a dataset root such as ``data/raw/banana-detection``,
    in memory or streamed (``loader``: ``data.loader``, see :func:`resolve_loader`).

    ``max_pixels``: ``data.max_image_pixels`` (None: the default, 64 megapixels); ``limits``: the
    label file's (``LabelLimits.of(data)``; default: ``params.yaml``'s defaults).
    """
    index = index_split(find_split(root, split), classes, limits)
    max_pixels = int(max_pixels) if max_pixels else DEFAULT_MAX_IMAGE_PIXELS
    kind = DetectionDataset if resolve_loader(loader, len(index), image_size) == MEMORY else StreamDataset
    return kind(index, image_size, max_pixels, classes)


def load_dataset(root: str | Path, split: str, image_size: int = 256, classes: Sequence[str] = ("banana",),
                 max_pixels: int | None = None, limits: LabelLimits = LabelLimits()) -> DetectionDataset:
    """:func:`open_split` in memory."""
    return open_split(root, split, image_size, classes, max_pixels, limits, MEMORY)


def read_split(split_dir: str | Path, image_size: int = 256, classes: Sequence[str] = ("banana",),
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               limits: LabelLimits = LabelLimits()) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One split in memory: ``images uint8 Tensor[N, 3, S, S]``, ``labels float32 Tensor[N, M, 5]``
    rows ``(class, x1, y1, x2, y2)`` in [0, 1] of the displayed image, padded with rows of -1 to the
    split's most crowded image, and the image names."""
    dataset = DetectionDataset(index_split(split_dir, classes, limits), image_size, max_pixels, classes)
    return dataset.images, dataset.labels, dataset.names
