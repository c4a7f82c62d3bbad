"""Detect in image files: read them (any size, mode or format), detect, draw the boxes on copies.

:func:`predict_files` gives one dict per image (``{"image", "width", "height", "detections":
[{"class_id", "label", "score", "box": [x1, y1, x2, y2]}]}``, boxes in pixels of the image as
displayed, EXIF orientation applied, and ``"model"``: which model answered, :func:`ssd.engine.inference.describe`)
and, with ``out``, writes ``<out>/<image stem>.png`` with the boxes drawn, the model named in a caption and
in the PNG's text chunk ``ssd:model`` (the same block as JSON). A folder stands for its image files
(by extension, sorted). ``ssd predict``
(``ssd.stages.predict``) prints these; the MLflow pyfunc reads encoded bytes with :func:`read_images`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageDraw, PngImagePlugin

from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, read_image, read_rgb, to_tensor
from ssd.engine.inference import Detector, describe, detect, load_detector
from ssd.util.files import atomic_path

PRED_COLOR = (255, 255, 255)   # the seed's display() draws predictions in white
TRUTH_COLOR = (0, 200, 0)
MODEL_TEXT_KEY = "ssd:model"  # PNG text chunk of annotated pictures: the model block as JSON


def read_images(sources: Sequence[str | Path | bytes], image_size: int,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Files or encoded bytes (any size and mode) as ``uint8 Tensor[N, 3, S, S]`` and displayed sizes
    (:func:`ssd.data.dataset.read_image`); the first that cannot be read raises, naming it (``image #i`` for bytes)."""
    tensors, sizes = [], []
    for i, src in enumerate(sources):
        if isinstance(src, (bytes, bytearray)):
            tensor, size = read_image(io.BytesIO(src), image_size, max_pixels, name=f"image #{i}")
        else:
            tensor, size = read_image(src, image_size, max_pixels)
        tensors.append(tensor)
        sizes.append(size)
    if not tensors:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), []
    return torch.stack(tensors), sizes


def expand_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files as given (PIL decodes by content), a folder as its image files (by extension, sorted by name).

    Returns the files and a one-line problem for each folder without images.
    """
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


def draw_detections(image: Image.Image, detections: Sequence[dict[str, Any]],
                    truth: Sequence[Sequence[float]] = (), width: int | None = None) -> Image.Image:
    """A copy of ``image`` with predicted boxes (white, with scores) and ground truth (green), pixel boxes."""
    image = image.convert("RGB")
    width = width or max(1, round(max(image.size) / 150))
    draw = ImageDraw.Draw(image)
    for box in truth:
        draw.rectangle([float(v) for v in box], outline=TRUTH_COLOR, width=width)
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        draw.rectangle([x1, y1, x2, y2], outline=PRED_COLOR, width=width)
        draw.text((x1 + 2, y1 + 1), f"{det['score']:.2f}", fill=PRED_COLOR)
    return image


def _read_batch(paths: Sequence[Path], max_pixels: int,
                on_error: Callable[[str], None] | None) -> list[tuple[Path, Image.Image]]:
    """The images of ``paths`` that can be read; each other one goes to ``on_error`` (raises without it)."""
    batch = []
    for path in paths:
        try:
            batch.append((path, read_rgb(path, max_pixels)))
        except (ValueError, OSError) as exc:
            if on_error is None:
                raise
            on_error(str(exc))
    return batch


def predict_files(images: Sequence[str | Path], model: str | Path | Detector, threshold: float = 0.9,
                  out: str | Path | None = None, image_size: int | None = None, nms_threshold: float = 0.5,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, on_error: Callable[[str], None] | None = None,
                  batch_size: int = 32, device: str | torch.device | None = None,
                  per_class: bool = False) -> list[dict[str, Any]]:
    """Detect in image files and folders (:func:`expand_images`); with ``out``, write annotated copies there.

    Returns one dict per image read. ``model``: a model file, loaded with ``nms_threshold``,
    ``per_class``, ``device`` and the image size it records (``image_size`` if it records none), or
    a loaded :class:`Detector` (``ssd.mlops.models``), which brings all of them. ``on_error``: when
    given, an image that cannot be read (missing, not an image, over ``max_pixels``) or a folder
    without images is passed to it as a one-line message and skipped; without it, the first raises.
    The images go through the model ``batch_size`` at a time (only one batch of pictures is held).
    """
    detector = model if isinstance(model, Detector) else load_detector(model, image_size, nms_threshold, device,
                                                                       per_class)
    net, image_size = detector.net, detector.image_size
    block = describe(detector)
    files, problems = expand_images(images)
    for problem in problems:
        if on_error is None:
            raise ValueError(problem)
        on_error(problem)
    results: list[dict[str, Any]] = []
    written: set[str] = set()
    for start in range(0, len(files), batch_size):
        batch = _read_batch(files[start:start + batch_size], max_pixels, on_error)
        if not batch:
            continue
        sizes = [img.size for _, img in batch]
        tensors = torch.stack([to_tensor(img, image_size) for _, img in batch])
        found = detect(net, tensors, sizes, threshold, detector.nms_threshold, batch_size,
                       per_class=detector.per_class)
        for (path, img), size, dets in zip(batch, sizes, found):
            result = {"image": str(path), "width": size[0], "height": size[1], "detections": dets}
            if out is not None:
                result["annotated"] = str(_annotate(img, dets, Path(out), path.stem, written, len(results), block))
            results.append({**result, "model": block})
    return results


def model_caption(block: dict[str, Any]) -> str:
    """One line naming the model of a ``model`` block: ``tinyssd v3 @champion`` or the file's name."""
    if block.get("name"):
        alias = f" @{block['alias']}" if block.get("alias") else ""
        return f"{block['name']} v{block['version']}{alias}"
    return Path(str(block.get("uri", ""))).name or "model"


def _annotate(image: Image.Image, detections: Sequence[dict[str, Any]], out: Path, stem: str,
              written: set[str], index: int, block: dict[str, Any]) -> Path:
    """Write ``image`` with its boxes to ``out/<stem>.png``, or ``<stem>-<n>.png`` with the first ``n`` from
    ``index`` that no earlier picture of this call took (a.png, a.jpg and a-1.png all given: three pictures)."""
    name, n = stem, index
    while name in written:
        name, n = f"{stem}-{n}", n + 1
    written.add(name)
    picture = draw_detections(image, detections)
    ImageDraw.Draw(picture).text((2, picture.height - 12), model_caption(block), fill=PRED_COLOR)
    info = PngImagePlugin.PngInfo()
    info.add_text(MODEL_TEXT_KEY, json.dumps(block))
    with atomic_path(out / f"{name}.png") as tmp:
        picture.save(tmp, format="PNG", pnginfo=info)
    return out / f"{name}.png"
