"""The one image reader of every stage (validate, train, evaluate, predict and the served model).

Any size, format and mode (PIL decodes by content, not by extension), EXIF orientation applied, the
first frame of an animation, 16-bit and float images scaled to 8-bit RGB, images over
``data.max_image_pixels`` refused with a one-line error. :func:`read_image` resizes to a square
``image_size`` and returns the displayed size, by which label boxes are normalised.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

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
