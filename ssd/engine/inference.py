"""Detect objects: the one place where a trained TinySSD turns pictures into boxes.

``ssd.core.anchors.decode_outputs`` turns the net's outputs into detections; :func:`detect_raw`
runs the net on a uint8 batch first; :func:`detect` adds the score threshold and the scaling back to
original-image pixels. ``ssd predict`` (through ``ssd.engine.prediction``), the MLflow pyfunc
(``ssd.mlops.pyfunc``) and the evaluation all go through these.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from ssd.core.anchors import decode_outputs
from ssd.core.model import as_input, read_model
from ssd.util.settings import NMS_MODES

# What detection uses where neither the model nor params say (outside a checkout): params.yaml's own
# values (tests/test_predict.py keeps them equal) and TinySSD's default image size.
DEFAULT_IMAGE_SIZE = 256
DEFAULT_NMS_THRESHOLD = 0.5
DEFAULT_THRESHOLD = 0.9
_, PER_CLASS_NMS = NMS_MODES  # evaluate.nms: NMS within each class; the other mode is the book's class-agnostic NMS


class ModelSource(NamedTuple):
    """Where a model came from, for the outputs to name it."""
    uri: str                    # as given: a model URI or a file path
    name: str | None = None     # the registered model's name, version and the alias that resolved to it
    version: int | None = None
    alias: str | None = None
    run_id: str | None = None   # the MLflow run that trained it, when known


class Detector(NamedTuple):
    """A loaded TinySSD and the settings it detects with."""
    net: torch.nn.Module
    image_size: int
    nms_threshold: float
    per_class: bool = False            # NMS within each class (evaluate.nms: per_class)
    source: ModelSource | None = None


def describe(detector: Detector) -> dict[str, Any]:
    """The ``model`` block of predictions: where the model came from, its classes and detection settings."""
    source = detector.source or ModelSource("")
    return {**source._asdict(), "classes": list(detector.net.config.classes), "image_size": detector.image_size,
            "nms_threshold": detector.nms_threshold, "nms": NMS_MODES[1] if detector.per_class else NMS_MODES[0]}


def best_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (not ``"auto"``), else the first GPU when there is one, else the CPU."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def detect_raw(net: torch.nn.Module, images: torch.Tensor, nms_threshold: float = 0.5,
               max_detections: int | None = None, *, per_class: bool = False) -> list[torch.Tensor]:
    """Detections of a ``uint8 Tensor[B, 3, S, S]`` batch (0..255, unnormalised, as in the seed), before
    any score threshold, on the net's device: see :func:`ssd.core.anchors.decode_outputs`."""
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
        per_class: NMS within each class only (see :func:`ssd.core.anchors.decode_outputs`).
    """
    classes = net.config.classes
    results: list[list[dict[str, Any]]] = []
    for start in range(0, len(images), batch_size):
        raw = detect_raw(net, images[start:start + batch_size], nms_threshold, per_class=per_class)
        results += [to_pixels(r, sizes[start + i], classes, threshold) for i, r in enumerate(raw)]
    return results


def load_detector(model_file: str | Path, image_size: int | None = None, nms_threshold: float = DEFAULT_NMS_THRESHOLD,
                  device: str | torch.device | None = None, per_class: bool = False) -> Detector:
    """A TinySSD from a model file, on ``device`` (default :func:`best_device`), to detect at the image
    size it was trained at (``image_size`` when the file does not record it, else 256; one that
    contradicts the file is a ``ValueError``). A missing file raises ``FileNotFoundError`` naming it."""
    file = read_model(model_file, map_location=best_device(device))
    if image_size is not None and file.image_size is not None and image_size != file.image_size:
        raise ValueError(f"{model_file} was trained at image size {file.image_size}, not {image_size}")
    return Detector(file.net, file.image_size or image_size or DEFAULT_IMAGE_SIZE, nms_threshold, per_class,
                    ModelSource(str(model_file), run_id=file.run_id))
