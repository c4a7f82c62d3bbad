"""Reading detection datasets in the banana layout.

A split is a folder holding ``images/`` and ``label.csv`` (``labels.csv`` is accepted too) with
the header ``img_name,label,xmin,ymin,xmax,ymax``: one row per box, pixel corner coordinates,
``label`` a class index or a class name, boxes in the displayed frame of the image (EXIF orientation
applied, as viewers and annotation tools show it).

Every stage reads images with :func:`read_image` (validate, train, evaluate, predict and the served
model): any size, format and mode (PIL decodes by content, not by extension), EXIF orientation
applied, the first frame of an animation, 16-bit and float images scaled to 8-bit RGB, images over
``data.max_image_pixels`` refused with a one-line error. Images are resized to a square
``image_size``; boxes are normalised to [0, 1] by the displayed size, so they survive the resize.

Images stay in memory as one ``uint8`` tensor (1000 banana images take 197 MB); they become float
(0..255, unnormalised, as in the seed) only on the way into the model.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ssd.data.layout import IMAGES_DIR, LABEL_COLUMNS, LABEL_FILE, SPLIT_DIRS

LABEL_FILES = (LABEL_FILE, "labels.csv")
SPLITS = {"train": (SPLIT_DIRS["train"], "train"), "val": (SPLIT_DIRS["val"], "val", "test")}
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000   # data.max_image_pixels: a 64-megapixel photo decodes to ~200 MB of RGB
# What a folder of images holds (`ssd predict DIR`); a file named explicitly is decoded by content.
IMAGE_EXTENSIONS = (".apng", ".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm",
                    ".tif", ".tiff", ".webp")


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


class ImageTooLarge(ValueError):
    """An image with more pixels than ``data.max_image_pixels``: refused before its pixels are decoded."""


def _declared_size(source: str | Path | BinaryIO) -> tuple[int, int] | None:
    """The size an image's header declares, read with PIL's guard off (nothing is decoded); the
    caller restores ``Image.MAX_IMAGE_PIXELS``."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        with Image.open(source) as img:
            return img.size
    except Exception:  # noqa: BLE001 (only for the message)
        return None


def open_image(source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               name: str | None = None) -> Image.Image:
    """The image as it is displayed: EXIF orientation applied, first frame of an animation, pixels loaded.

    The mode is the file's own (see :func:`to_rgb`). ``name`` is how errors name the image (default: the
    path). Raises ``FileNotFoundError`` for a missing file, :class:`ImageTooLarge` for more than
    ``max_pixels`` pixels (checked from the header, before decoding) and ``ValueError`` for anything
    that does not decode as an image; each a one-line message naming the image.
    """
    name = name or str(source)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"{name}: image not found")
    # PIL's own guard checks every size it meets (the header, and frames or sub-images while decoding):
    # it follows the limit while this image is read, its warning (above the limit) is an error like
    # its refusal (above twice it), and both become one message naming the size. Restored after, so
    # other PIL users in the process keep their own limit.
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                # exif_transpose decodes the current frame (the first, just after opening) into a new
                # image in the displayed frame, and drops the orientation tag from it.
                return ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = _declared_size(source)
        what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
        raise ImageTooLarge(f"{name}: image too large ({what}; the limit is data.max_image_pixels = "
                            f"{max_pixels})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}: cannot be read as an image (not a format PIL recognises)") from None
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, struct.error...)
        raise ValueError(f"{name}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Integer or float pixels as ``uint8``, scaled by the bit depth (16-bit) or the values' range."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        scale, offset = 255 / 65535, 0.0          # 16-bit data: keep its brightness, as viewers do
    elif mode == "F" and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0                # a float image in [0, 1]
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0                  # already 8-bit values
    else:
        scale, offset = 255 / max(high - low, 1e-12), low  # anything else: stretch its range to 0..255
    return np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and 32-bit greyscale (``I;16*``, ``I``) and float (``F``) are scaled
    to 0..255 (PIL's own conversion clips them, so 16-bit data become almost all white); alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_8bit(np.asarray(img), img.mode)).convert("RGB")
    return img.convert("RGB")


def read_rgb(source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             name: str | None = None) -> Image.Image:
    """The displayed image (:func:`open_image`) as 8-bit RGB (:func:`to_rgb`); errors as :func:`open_image`."""
    img = open_image(source, max_pixels, name)
    try:
        return to_rgb(img)
    except (OSError, ValueError) as exc:  # a mode PIL decodes but cannot convert
        raise ValueError(f"{name or source}: cannot be converted to RGB from mode {img.mode} ({exc})") from None


def to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB image resized to ``uint8 Tensor[3, S, S]`` (``S = image_size``)."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def read_image(source: str | Path | BinaryIO, image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               name: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The one image reader of every stage: ``uint8 Tensor[3, S, S]`` and the displayed ``(width, height)``.

    Displayed means as viewers and annotation tools show it (EXIF orientation applied): label boxes
    are in that frame, are normalised by that size, and predictions come back in it. Errors as
    :func:`open_image`.
    """
    img = read_rgb(source, max_pixels, name)
    return to_tensor(img, image_size), img.size


def _box(row: object, where: str) -> list[float]:
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


def read_split(split_dir: str | Path, image_size: int = 256, classes: Sequence[str] = ("banana",),
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split (``ssd validate`` checks it in full first; this refuses what it cannot read).

    Returns:
        ``images uint8 Tensor[N, 3, S, S]``, ``labels float32 Tensor[N, M, 5]`` rows
        ``(class, x1, y1, x2, y2)`` in [0, 1] of the displayed image, padded with rows of -1, and
        the image names.
    """
    split_dir = Path(split_dir)
    labels_path = label_file(split_dir)
    table = read_labels(labels_path)
    rows_by_image: dict[str, list[list[float]]] = {}
    for row_no, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        where = f"{labels_path} row {row_no}"
        if not isinstance(row.img_name, str) or not row.img_name.strip():
            raise ValueError(f"{where}: empty img_name")
        box = _box(row, where)
        rows_by_image.setdefault(row.img_name, []).append([class_index(row.label, classes, where), *box])
    names = list(rows_by_image)

    images = torch.empty(len(names), 3, image_size, image_size, dtype=torch.uint8)
    max_objects = max((len(r) for r in rows_by_image.values()), default=0)
    labels = torch.full((len(names), max_objects, 5), -1.0)
    for i, name in enumerate(names):
        path = split_dir / IMAGES_DIR / name
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
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.split_dir = Path(split_dir)
        self.classes = list(classes)
        self.images, self.labels, self.names = read_split(split_dir, image_size, classes, max_pixels)

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
                 max_pixels: int | None = None) -> DetectionDataset:
    """The ``split`` ("train" or "val") of a dataset root such as ``data/raw/banana-detection``.

    ``max_pixels``: ``data.max_image_pixels`` (None: the default, 64 megapixels).
    """
    return DetectionDataset(find_split(root, split), image_size, classes,
                            int(max_pixels) if max_pixels else DEFAULT_MAX_IMAGE_PIXELS)
