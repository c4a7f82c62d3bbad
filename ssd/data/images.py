"""The one image reader of every stage (validate, train, evaluate, predict and the served model).

Any size, format and mode (PIL decodes by content, not by extension), EXIF orientation applied, the
first frame of an animation, 16-bit and float images scaled to 8-bit RGB, images over
``data.max_image_pixels`` refused with a one-line error. :func:`read_image` resizes to a square
``image_size`` and returns the displayed size, by which label boxes are normalised.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000   # data.max_image_pixels: a 64-megapixel photo decodes to ~200 MB of RGB
# What a folder of images holds (`ssd predict DIR`); a file named explicitly is decoded by content.
IMAGE_EXTENSIONS = (".apng", ".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm",
                    ".tif", ".tiff", ".webp")


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
                # exif_transpose decodes the current frame (the first, just after opening), turns it
                # into the displayed frame and drops the orientation tag; in place, so the decoded
                # pixels are held once (a copy would double the peak of a 64-megapixel image).
                ImageOps.exif_transpose(img, in_place=True)
                return img
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


_CHUNK = 1 << 20  # pixels converted at a time: the temporaries stay at ~8 MB whatever the image


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """``(top row, float64 array of rows)`` strips of about :data:`_CHUNK` pixels, NaN and infinities
    as 0: never a whole-image copy of the pixels."""
    rows = max(1, _CHUNK // max(img.width, 1))
    for top in range(0, img.height, rows):
        strip = np.asarray(img.crop((0, top, img.width, min(top + rows, img.height))))
        yield top, np.nan_to_num(strip.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float greyscale image as 8-bit ``L``, scaled by the bit depth (16-bit) or
    the values' range; two passes over strips, so the memory it adds is the 1-byte result."""
    mode = img.mode
    ranges = [(float(a.min()), float(a.max())) for _, a in _strips(img) if a.size]
    low, high = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
        scale, offset = 255 / 65535, 0.0          # 16-bit data: keep its brightness, as viewers do
    elif mode == "F" and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0                # a float image in [0, 1]
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0                  # already 8-bit values
    else:
        scale, offset = 255 / max(high - low, 1e-12), low  # anything else: stretch its range to 0..255
    out = np.empty((img.height, img.width), dtype=np.uint8)
    for top, a in _strips(img):
        out[top:top + len(a)] = np.clip(np.rint((a - offset) * scale), 0, 255)
    return Image.fromarray(out)


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale (``I;16*``, ``I``) and float (``F``) as 8-bit ``L``, scaled to 0..255
    (PIL's own conversion clips them, so 16-bit data become almost all white); any other mode as is."""
    return _to_8bit(img) if img.mode.startswith("I") or img.mode == "F" else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (wide greyscale through :func:`to_8bit`); alpha is dropped."""
    img = to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _readable(name: str, img: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    try:
        return convert(img)
    except (OSError, ValueError) as exc:  # a mode PIL decodes but cannot convert
        raise ValueError(f"{name}: cannot be converted to RGB from mode {img.mode} ({exc})") from None


def read_rgb(source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             name: str | None = None) -> Image.Image:
    """The displayed image (:func:`open_image`) as 8-bit RGB (:func:`to_rgb`); errors as :func:`open_image`."""
    return _readable(name or str(source), open_image(source, max_pixels, name), to_rgb)


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
    :func:`open_image`. Greyscale is resized before it becomes RGB (the same pixels as
    :func:`read_rgb` then :func:`to_tensor`, without a full-size RGB copy).
    """
    img = _readable(name or str(source), open_image(source, max_pixels, name), to_8bit)
    size = img.size
    if img.mode == "L" and size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return to_tensor(_readable(name or str(source), img, to_rgb), image_size), size
