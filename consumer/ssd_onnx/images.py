"""Images as ``ssd predict`` reads them, for a package that cannot import ``ssd``: a deliberate copy.

Each name here is a copy of the one place it is defined in the ``ssd`` package:

- :data:`DEFAULT_MAX_IMAGE_PIXELS`, :data:`IMAGE_EXTENSIONS`, :func:`open_image`, :func:`to_8bit`,
  :func:`to_rgb`, :func:`read_rgb`: ``ssd.data.images`` (same names);
- :func:`to_array`: ``ssd.data.images.to_tensor`` (the bilinear resize to S x S), as a numpy array;
- :func:`expand_images`: ``ssd.engine.prediction.expand_images``.

``tests/pipeline/test_onnx_consumer.py`` checks that the constants are equal and that both give the
same pixels and sizes for the same files (EXIF-rotated, palette, 16-bit, float, RGBA). Change both.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".apng", ".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm",
                    ".tif", ".tiff", ".webp")


class ImageTooLarge(ValueError):
    """An image with more pixels than the model's limit: refused before its pixels are decoded."""


def _declared_size(source: str | Path) -> tuple[int, int] | None:
    Image.MAX_IMAGE_PIXELS = None  # the caller restores it
    try:
        with Image.open(source) as img:
            return img.size
    except Exception:  # noqa: BLE001 (only for the message)
        return None


def open_image(source: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image as displayed (EXIF orientation applied, first frame), pixels loaded; one-line
    ``FileNotFoundError``, :class:`ImageTooLarge` (checked from the header) or ``ValueError``."""
    name = str(source)
    if not Path(source).is_file():
        raise FileNotFoundError(f"{name}: image not found")
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                ImageOps.exif_transpose(img, in_place=True)
                return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = _declared_size(source)
        what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
        raise ImageTooLarge(f"{name}: image too large ({what}; the model's limit is max_image_pixels = "
                            f"{max_pixels})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}: cannot be read as an image (not a format PIL recognises)") from None
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"{name}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


_CHUNK = 1 << 20


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    rows = max(1, _CHUNK // max(img.width, 1))
    for top in range(0, img.height, rows):
        strip = np.asarray(img.crop((0, top, img.width, min(top + rows, img.height))))
        yield top, np.nan_to_num(strip.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _to_8bit(img: Image.Image) -> Image.Image:
    mode = img.mode
    ranges = [(float(a.min()), float(a.max())) for _, a in _strips(img) if a.size]
    low, high = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        scale, offset = 255 / 65535, 0.0
    elif mode == "F" and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    else:
        scale, offset = 255 / max(high - low, 1e-12), low
    out = np.empty((img.height, img.width), dtype=np.uint8)
    for top, a in _strips(img):
        out[top:top + len(a)] = np.clip(np.rint((a - offset) * scale), 0, 255)
    return Image.fromarray(out)


def to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale as 8-bit ``L`` (scaled, not clipped); any other mode as is."""
    return _to_8bit(img) if img.mode.startswith("I") or img.mode == "F" else img


def to_rgb(img: Image.Image) -> Image.Image:
    img = to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def read_rgb(source: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The displayed image as 8-bit RGB; errors as :func:`open_image`."""
    img = open_image(source, max_pixels)
    try:
        return to_rgb(img)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source}: cannot be converted to RGB from mode {img.mode} ({exc})") from None


def to_array(img: Image.Image, image_size: int) -> np.ndarray:
    """An RGB image resized (bilinear) to ``uint8 [3, S, S]``."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.ascontiguousarray(np.array(img).transpose(2, 0, 1))


def expand_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files as given, a folder as its image files (by extension, sorted by name); and a one-line
    problem for each folder without images."""
    files, problems = [], []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            problems.append(f"{path}: folder holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
        files += found
    return files, problems
