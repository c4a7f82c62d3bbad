"""Detect bananas in images: the one place where a trained TinySSD turns pictures into boxes.

``decode_outputs`` turns the net's outputs into detections (softmax, then the book's
``multibox_detection``); ``detect_raw`` runs the net on a uint8 batch first; ``detect`` adds the
score threshold and the scaling back to original-image pixels. The ``ssd predict`` command, the
MLflow pyfunc (``ssd.mlops.pyfunc``) and the evaluation (metrics and gallery) all go through these.

    ssd predict IMAGE_OR_FOLDER... [--model models:/tinyssd@champion | models/model.pt] [--threshold 0.9] [--out DIR]

prints one JSON object per image (``{"image", "width", "height", "detections": [{"class_id",
"label", "score", "box": [x1, y1, x2, y2]}]}``, boxes in pixels of the image as displayed, EXIF
orientation applied) and, with ``--out``, writes ``DIR/<image stem>.png`` with the boxes drawn. A
folder stands for its image files (by extension, sorted). A file that cannot be read (missing, not
an image, too large) is reported on stderr and skipped; the others are still predicted, and the
command exits 1 at the end.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ssd.core.anchors import multibox_detection
from ssd.core.model import as_input
from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, read_image, read_rgb, to_tensor

DEFAULT_MODEL = "models:/tinyssd@champion"
PRED_COLOR = (255, 255, 255)   # the seed's display() draws predictions in white
TRUTH_COLOR = (0, 200, 0)


def best_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (not ``"auto"``), else the first GPU when there is one, else the CPU."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decode_outputs(anchors: torch.Tensor, cls_preds: torch.Tensor, bbox_preds: torch.Tensor,
                   nms_threshold: float = 0.5, max_detections: int | None = None, *,
                   per_class: bool = False) -> list[torch.Tensor]:
    """The net's outputs (``Tensor[1, A, 4]``, ``Tensor[B, A, C + 1]`` logits, ``Tensor[B, A * 4]``) as detections.

    Returns ``B`` CPU tensors ``Tensor[K, 6]`` rows ``(class_id, score, x1, y1, x2, y2)``, boxes
    normalised to [0, 1], decreasing score, only the rows NMS kept (``class_id >= 0``), at most
    ``max_detections`` of them. ``per_class``: NMS within each class only (the book's is
    class-agnostic), see :func:`ssd.core.anchors.multibox_detection`.
    """
    cls_probs = F.softmax(cls_preds.float(), dim=2).permute(0, 2, 1)
    output = multibox_detection(cls_probs, bbox_preds.float(), anchors, nms_threshold, per_class=per_class)
    # One copy to the host, then the per-image selection there (no host sync per image on a GPU).
    # multibox_detection puts the kept rows first, in decreasing score.
    return [rows[rows[:, 0] >= 0][:max_detections] for rows in output.cpu()]


@torch.inference_mode()
def detect_raw(net: torch.nn.Module, images: torch.Tensor, nms_threshold: float = 0.5,
               max_detections: int | None = None, *, per_class: bool = False) -> list[torch.Tensor]:
    """Detections of a ``uint8 Tensor[B, 3, S, S]`` batch (0..255, unnormalised, as in the seed), before
    any score threshold, on the net's device: see :func:`decode_outputs`."""
    device = next(net.parameters()).device
    return decode_outputs(*net(as_input(images, device)), nms_threshold, max_detections, per_class=per_class)


def to_pixels(rows: torch.Tensor, size: tuple[int, int], classes: Sequence[str],
              threshold: float) -> list[dict[str, Any]]:
    """Rows ``Tensor[K, 6]`` (normalised) with score >= ``threshold`` as dicts in pixels of ``size`` (w, h)."""
    width, height = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    out = []
    for row in rows[rows[:, 1] >= threshold].double():
        box = (row[2:] * scale).clamp(min=0)
        box = torch.minimum(box, scale)
        out.append({"class_id": int(row[0]), "label": classes[int(row[0])], "score": round(float(row[1]), 6),
                    "box": [round(float(v), 2) for v in box]})
    return out


def detect(net: torch.nn.Module, images: torch.Tensor, sizes: Sequence[tuple[int, int]],
           threshold: float = 0.9, nms_threshold: float = 0.5, batch_size: int = 32, *,
           per_class: bool = False) -> list[list[dict[str, Any]]]:
    """Detections per image in original pixels.

    Args:
        images: ``uint8 Tensor[N, 3, S, S]`` as :func:`ssd.data.dataset.read_image` gives them.
        sizes: the displayed ``(width, height)`` of each image.
        per_class: NMS within each class only (see :func:`decode_outputs`).
    """
    classes = net.config.classes
    results: list[list[dict[str, Any]]] = []
    for start in range(0, len(images), batch_size):
        raw = detect_raw(net, images[start:start + batch_size], nms_threshold, per_class=per_class)
        results += [to_pixels(r, sizes[start + i], classes, threshold) for i, r in enumerate(raw)]
    return results


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


def is_model_uri(model: str | Path) -> bool:
    """``models:/...``, ``runs:/...``, ``file://...`` and the like, as opposed to a file path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(model)))


def load_detector(model: str | Path, image_size: int = 256, nms_threshold: float = 0.5,
                  device: str | torch.device | None = None) -> tuple[torch.nn.Module, int, float]:
    """A TinySSD from a model file or an MLflow model URI: ``(net, image_size, nms_threshold)``.

    A model file gets the ``image_size`` and ``nms_threshold`` passed in; an MLflow model
    carries its own (``ssd.mlops.pyfunc``). The net is on ``device`` (default :func:`best_device`). A
    missing file or model raises ``FileNotFoundError`` / ``RuntimeError`` naming it.
    """
    device = best_device(device)
    if not is_model_uri(model):
        from ssd.core.model import load_model

        return load_model(model, map_location=device), image_size, nms_threshold
    import mlflow
    from mlflow.exceptions import MlflowException

    from ssd.mlops.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(str(model))
    except MlflowException as exc:
        raise RuntimeError(f"cannot load model {model} from {tracking_uri()}: {exc.message}") from None
    detector = loaded.unwrap_python_model()
    return detector.net.to(device), detector.image_size, detector.nms_threshold


def predict_files(images: Sequence[str | Path], model: str | Path = DEFAULT_MODEL, threshold: float = 0.9,
                  out: str | Path | None = None, image_size: int = 256, nms_threshold: float = 0.5,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, on_error: Callable[[str], None] | None = None,
                  batch_size: int = 32, device: str | torch.device | None = None,
                  per_class: bool = False) -> list[dict[str, Any]]:
    """Detect in image files and folders (:func:`expand_images`); with ``out``, write annotated copies there.

    Returns one dict per image read. ``on_error``: when given, an image that cannot be read
    (missing, not an image, over ``max_pixels``) or a folder without images is passed to it as a
    one-line message and skipped; without it, the first raises. The model is loaded once and the
    images go through it ``batch_size`` at a time (only one batch of pictures is held).
    ``image_size`` and ``nms_threshold`` apply to a model file; an MLflow model brings its own.
    """
    from ssd.util.files import atomic_path

    def refuse(message: str) -> None:
        if on_error is None:
            raise ValueError(message)
        on_error(message)

    net, image_size, nms_threshold = load_detector(model, image_size, nms_threshold, device)
    files, problems = expand_images(images)
    for problem in problems:
        refuse(problem)
    results, written = [], set()
    for start in range(0, len(files), batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for path in files[start:start + batch_size]:
            try:
                batch.append((path, read_rgb(path, max_pixels)))
            except (ValueError, OSError) as exc:
                if on_error is None:
                    raise
                on_error(str(exc))
        if not batch:
            continue
        sizes = [img.size for _, img in batch]
        tensors = torch.stack([to_tensor(img, image_size) for _, img in batch])
        for (path, img), size, dets in zip(batch, sizes, detect(net, tensors, sizes, threshold, nms_threshold,
                                                                batch_size, per_class=per_class)):
            result = {"image": str(path), "width": size[0], "height": size[1], "detections": dets}
            if out is not None:
                name = path.stem
                if name in written:  # a.png and a.jpg both given: keep both pictures
                    name = f"{name}-{len(results)}"
                written.add(name)
                with atomic_path(Path(out) / f"{name}.png") as tmp:
                    draw_detections(img, dets).save(tmp, format="PNG")
                result["annotated"] = str(Path(out) / f"{name}.png")
            results.append(result)
    return results
