"""A TinySSD ONNX file on onnxruntime: its metadata, its detections, and ``ssd predict``'s records.

The file is ``ssd export``'s (or the one ``ssd register`` logs with a version): input ``images``
(``uint8 [B, 3, S, S]``), outputs the rows NMS kept (``batch_index, class_id, score, box`` as
fractions), settings in the metadata. The names of that contract and the pixel conversion are copies
of their one place in ``ssd`` (this package cannot import it); ``tests/pipeline/test_onnx_consumer.py``
checks that they agree:

- :data:`INPUT`, :data:`OUTPUTS`, :data:`META_PREFIX`, :data:`META_KEYS`: ``ssd.engine.onnx_export``;
- :data:`MAX_MODEL_BYTES`: ``ssd.mlops.models.MAX_WEIGHTS_BYTES``;
- :func:`to_pixels`: ``ssd.engine.inference.to_pixels``; :func:`predict_files` follows
  ``ssd.engine.prediction.predict_files`` (records, batches, skipped files).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ssd_onnx.images import DEFAULT_MAX_IMAGE_PIXELS, expand_images, read_rgb, to_array

INPUT = "images"
OUTPUTS = ("batch_index", "class_id", "score", "box")
META_PREFIX = "ssd."
META_KEYS = ("image_size", "classes", "nms_threshold", "nms", "threshold", "max_image_pixels", "model", "input",
             "outputs")
MAX_MODEL_BYTES = 1 << 30   # a TinySSD's ONNX file is a few MB


class OnnxModel(NamedTuple):
    session: Any               # onnxruntime.InferenceSession
    image_size: int
    classes: list[str]
    threshold: float           # the default minimum score
    max_pixels: int            # the largest image decoded
    block: dict[str, Any]      # the ``model`` block of every record (``ssd predict``'s)


def _meta(path: str, meta: dict[str, str], key: str, parse: Callable[[str], Any], ok: Callable[[Any], bool],
          expected: str) -> Any:
    raw = meta.get(META_PREFIX + key)
    if raw is None:
        raise ValueError(f"{path}: not a TinySSD ONNX file (its metadata has no {META_PREFIX}{key})")
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise ValueError(f"{path}: its metadata {META_PREFIX}{key} = {raw[:80]!r}: expected {expected}")
    return value


def load(path: str | Path, source: dict[str, Any] | None = None) -> OnnxModel:
    """The ONNX file at ``path`` on onnxruntime's CPU, with its metadata checked; ``source`` replaces
    entries of the ``model`` block (``uri``, ``alias``: how the user named it). One-line refusals."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a TinySSD ONNX file's {MAX_MODEL_BYTES}: refused")
    try:  # from bytes: a graph naming external data files finds none (nothing else is read from disk)
        session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors are long; the first line says what
        raise ValueError(f"{path}: not an ONNX model onnxruntime can run ({str(exc).splitlines()[0][:200]})") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    name = str(path)
    image_size = _meta(name, meta, "image_size", int, lambda v: v >= 32, "an integer >= 32")
    classes = _meta(name, meta, "classes", json.loads,
                    lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v), "a JSON list of names")
    threshold = _meta(name, meta, "threshold", float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    block = _meta(name, meta, "model", json.loads, lambda v: isinstance(v, dict), "a JSON object")
    max_pixels = (_meta(name, meta, "max_image_pixels", int, lambda v: v >= 1, "an integer >= 1")
                  if META_PREFIX + "max_image_pixels" in meta else DEFAULT_MAX_IMAGE_PIXELS)
    names = [o.name for o in session.get_outputs()]
    if [i.name for i in session.get_inputs()] != [INPUT] or names != list(OUTPUTS):
        raise ValueError(f"{path}: not a TinySSD ONNX file (outputs {names}, expected {list(OUTPUTS)})")
    block = {**block, "uri": str(path), "alias": block.get("alias"), **(source or {})}
    return OnnxModel(session, image_size, classes, threshold, max_pixels, block)


def detect(model: OnnxModel, images: np.ndarray) -> list[np.ndarray]:
    """Per image of a ``uint8 [B, 3, S, S]`` batch, ``float [K, 6]`` rows ``(class_id, score, x1, y1,
    x2, y2)`` (fractions), best score first, every row NMS kept."""
    batch, class_id, score, box = model.session.run(list(OUTPUTS), {INPUT: images})
    rows = np.concatenate([class_id.astype(np.float32)[:, None], score[:, None], box], axis=1)
    out = []
    for i in range(len(images)):
        mine = rows[batch == i]
        out.append(mine[np.argsort(-mine[:, 1], kind="stable")])
    return out


def to_pixels(rows: np.ndarray, size: tuple[int, int], classes: Sequence[str], threshold: float) -> list[dict[str, Any]]:
    """Rows with score >= ``threshold`` as dicts with boxes in pixels of ``size`` (w, h), clipped to it."""
    width, height = size
    scale = np.array([width, height, width, height], dtype=np.float64)
    out = []
    for row in rows[rows[:, 1] >= threshold].astype(np.float64):
        box = np.minimum(np.maximum(row[2:] * scale, 0), scale)
        out.append({"class_id": int(row[0]), "label": classes[int(row[0])], "score": round(float(row[1]), 6),
                    "box": [round(float(v), 2) for v in box]})
    return out


def predict_files(model: OnnxModel, images: Sequence[str | Path], threshold: float | None = None,
                  batch_size: int = 32, on_error: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One record per image read (``{"image", "width", "height", "detections", "model"}``), files and
    folders as ``ssd predict`` takes them; an unreadable one goes to ``on_error`` (raises without it)."""
    threshold = model.threshold if threshold is None else threshold
    files, problems = expand_images(images)
    for problem in problems:
        if on_error is None:
            raise ValueError(problem)
        on_error(problem)
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            try:
                batch.append((path, read_rgb(path, model.max_pixels)))
            except (ValueError, OSError) as exc:
                if on_error is None:
                    raise
                on_error(str(exc))
        if not batch:
            continue
        arrays = np.stack([to_array(img, model.image_size) for _, img in batch])
        for (path, img), rows in zip(batch, detect(model, arrays)):
            results.append({"image": str(path), "width": img.width, "height": img.height,
                            "detections": to_pixels(rows, img.size, model.classes, threshold), "model": model.block})
    return results
