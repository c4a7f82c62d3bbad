"""Detect bananas in images: the one place where a trained TinySSD turns pictures into boxes.

``decode_outputs`` turns the net's outputs into detections (softmax, then the book's
``multibox_detection``); ``detect_raw`` runs the net on a uint8 batch first; ``detect`` adds the
score threshold and the scaling back to original-image pixels. The ``ssd predict`` command, the
MLflow pyfunc (``ssd.pyfunc``) and the evaluation (metrics and gallery) all go through these.

    ssd predict IMAGE... [--model models:/tinyssd@champion | models/model.pt] [--threshold 0.9] [--out DIR]

prints one JSON object per image (``{"image", "width", "height", "detections": [{"class_id",
"label", "score", "box": [x1, y1, x2, y2]}]}``, boxes in original-image pixels) and, with
``--out``, writes ``DIR/<image stem>.png`` with the boxes drawn.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .anchors import multibox_detection
from .data import load_image

DEFAULT_MODEL = "models:/tinyssd@champion"
PRED_COLOR = (255, 255, 255)   # the seed's display() draws predictions in white
TRUTH_COLOR = (0, 200, 0)


NMS_MODES = ("agnostic", "per_class")


def per_class_nms(mode: str) -> bool:
    """``evaluate.nms`` as the ``per_class`` flag of ``multibox_detection``; a bad value is named."""
    if mode not in NMS_MODES:
        raise ValueError(f"evaluate.nms={mode!r}: expected one of {', '.join(NMS_MODES)}")
    return mode == "per_class"


def decode_outputs(anchors: torch.Tensor, cls_preds: torch.Tensor, bbox_preds: torch.Tensor,
                   nms_threshold: float = 0.5, max_detections: int | None = None,
                   per_class: bool = False) -> list[torch.Tensor]:
    """The net's outputs (``Tensor[1, A, 4]``, ``Tensor[B, A, C + 1]`` logits, ``Tensor[B, A * 4]``) as detections.

    Returns ``B`` tensors ``Tensor[K, 6]`` rows ``(class_id, score, x1, y1, x2, y2)``, boxes
    normalised to [0, 1], decreasing score, only the rows NMS kept (``class_id >= 0``), at most
    ``max_detections`` of them.
    """
    cls_probs = F.softmax(cls_preds.float(), dim=2).permute(0, 2, 1)
    output = multibox_detection(cls_probs, bbox_preds.float(), anchors, nms_threshold, per_class=per_class)
    # multibox_detection puts the kept rows first, in decreasing score.
    return [rows[rows[:, 0] >= 0][:max_detections].cpu() for rows in output]


@torch.inference_mode()
def detect_raw(net: torch.nn.Module, images: torch.Tensor, nms_threshold: float = 0.5,
               max_detections: int | None = None, per_class: bool = False) -> list[torch.Tensor]:
    """Detections of a ``uint8 Tensor[B, 3, S, S]`` batch (0..255, unnormalised, as in the seed), before
    any score threshold: see :func:`decode_outputs`."""
    device = next(net.parameters()).device
    return decode_outputs(*net(images.to(device).float()), nms_threshold, max_detections, per_class)


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
           threshold: float = 0.9, nms_threshold: float = 0.5, batch_size: int = 32,
           per_class: bool = False) -> list[list[dict[str, Any]]]:
    """Detections per image in original pixels.

    Args:
        images: ``uint8 Tensor[N, 3, S, S]`` as :func:`ssd.data.load_image` gives them.
        sizes: the original ``(width, height)`` of each image.
    """
    classes = net.config.classes
    results: list[list[dict[str, Any]]] = []
    for start in range(0, len(images), batch_size):
        raw = detect_raw(net, images[start:start + batch_size], nms_threshold, per_class=per_class)
        results += [to_pixels(r, sizes[start + i], classes, threshold) for i, r in enumerate(raw)]
    return results


def read_images(sources: Sequence[str | Path | bytes], image_size: int
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Files or encoded bytes (any size and mode) as ``uint8 Tensor[N, 3, S, S]`` and original sizes."""
    tensors, sizes = [], []
    for i, src in enumerate(sources):
        if isinstance(src, (bytes, bytearray)):
            try:
                tensor, size = load_image(io.BytesIO(src), image_size)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"image #{i}: the bytes are not an image ({exc.__cause__ or exc})") from None
        else:
            path = Path(src)
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {path}")
            tensor, size = load_image(path, image_size)
        tensors.append(tensor)
        sizes.append(size)
    if not tensors:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), []
    return torch.stack(tensors), sizes


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


def load_detector(model: str | Path, image_size: int = 256, nms_threshold: float = 0.5
                  ) -> tuple[torch.nn.Module, int, float]:
    """A TinySSD from a model file or an MLflow model URI: ``(net, image_size, nms_threshold)``.

    A model file gets the ``image_size`` and ``nms_threshold`` passed in; an MLflow model
    carries its own (``ssd.pyfunc``). A missing file or model raises ``FileNotFoundError`` /
    ``RuntimeError`` naming it.
    """
    if not is_model_uri(model):
        from .model import load_model

        return load_model(model), image_size, nms_threshold
    import mlflow
    from mlflow.exceptions import MlflowException

    from .tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(str(model))
    except MlflowException as exc:
        raise RuntimeError(f"cannot load model {model} from {tracking_uri()}: {exc.message}") from None
    detector = loaded.unwrap_python_model()
    return detector.net, detector.image_size, detector.nms_threshold


def predict_files(images: Sequence[str | Path], model: str | Path = DEFAULT_MODEL, threshold: float = 0.9,
                  out: str | Path | None = None, image_size: int = 256, nms_threshold: float = 0.5,
                  per_class: bool = False) -> list[dict[str, Any]]:
    """Detect in image files; with ``out``, write annotated copies there. Returns one dict per image.

    ``image_size`` and ``nms_threshold`` apply to a model file; an MLflow model brings its own.
    """
    from .files import atomic_path

    net, image_size, nms_threshold = load_detector(model, image_size, nms_threshold)
    tensors, sizes = read_images(images, image_size)
    results, written = [], set()
    for path, size, dets in zip(images, sizes, detect(net, tensors, sizes, threshold, nms_threshold,
                                                        per_class=per_class)):
        result = {"image": str(path), "width": size[0], "height": size[1], "detections": dets}
        if out is not None:
            name = Path(path).stem
            if name in written:  # a.png and a.jpg both given: keep both pictures
                name = f"{name}-{len(results)}"
            written.add(name)
            with Image.open(path) as img:
                annotated = draw_detections(img, dets)
            with atomic_path(Path(out) / f"{name}.png") as tmp:
                annotated.save(tmp, format="PNG")
            result["annotated"] = str(Path(out) / f"{name}.png")
        results.append(result)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_params_arguments

    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size, mode or format)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="MLflow model URI or a model.pt file (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="minimum score of a reported box (default: params evaluate.threshold)")
    parser.add_argument("--out", default=None, help="folder for annotated images (default: none written)")
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from .params import load_params

    params = load_params(args.params, args.set) if Path(args.params).is_file() else {}
    evaluate = params.get("evaluate", {})
    threshold = args.threshold if args.threshold is not None else float(evaluate.get("threshold", 0.9))
    results = predict_files(args.images, args.model, threshold, args.out,
                            image_size=int(params.get("data", {}).get("image_size", 256)),
                            nms_threshold=float(evaluate.get("nms_threshold", 0.5)),
                            per_class=per_class_nms(str(evaluate.get("nms", "agnostic"))))
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
