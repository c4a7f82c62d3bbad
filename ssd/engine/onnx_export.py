"""A TinySSD as one ONNX graph, decoding and NMS included, that onnxruntime runs without torch.

Graph (:func:`export_onnx`):

- input ``images``: ``uint8 [B, 3, S, S]``, RGB, 0..255, each image resized to ``S x S`` (bilinear,
  as ``ssd.data.images.to_tensor``; ``S`` = metadata ``ssd.image_size``);
- outputs, one row per detection that NMS kept (any score >= 0.01; the consumer applies its own
  score threshold): ``batch_index int64 [K]`` (the image), ``class_id int64 [K]``, ``score float32
  [K]`` and ``box float32 [K, 4]`` (``x1, y1, x2, y2`` as fractions of the image's width and height:
  multiply by them for pixels). Rows come image by image, best score first.

The anchors, the box decoding (``ssd.core.anchors.offset_inverse``) and the NMS threshold and mode
are part of the graph (ONNX ``NonMaxSuppression``). The model's settings are also in the file's
metadata (:data:`META_PREFIX` + each of :data:`META_KEYS`: image size, class names as JSON, NMS
threshold and mode, the default score threshold, the image pixel limit, and the ``model`` block
naming where it came from). :func:`compare` is the check every written file passes: onnxruntime's
detections equal PyTorch's within :data:`ATOL`. The consumer without torch (``consumer/ssd_onnx``)
keeps copies of these names; ``tests/pipeline/test_onnx_consumer.py`` checks they agree.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssd.core.anchors import offset_inverse
from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS
from ssd.engine.inference import Detector, describe, detect_raw
from ssd.util.files import atomic_path

INPUT = "images"
OUTPUTS = ("batch_index", "class_id", "score", "box")
POS_THRESHOLD = 0.009999999  # ssd.core.anchors.multibox_detection's: rows under it are never detections
META_PREFIX = "ssd."
META_KEYS = ("image_size", "classes", "nms_threshold", "nms", "threshold", "max_image_pixels", "model", "input",
             "outputs")
# How far onnxruntime's scores and box fractions may be from PyTorch's for the same rows (same count,
# each row matched by one of its class: unmatched_rows): float32 kernels that sum in another order
# differ by ~1e-6; 1e-4 is a tenth of a pixel on a 1000-pixel image.
ATOL = 1e-4
OPSET = 20
_TRACED = ("boxes", "nms_scores", "conf", "class_ids")  # DecodedSSD's outputs, before NMS


class DecodedSSD(nn.Module):
    """TinySSD with its anchors and box decoding: ``uint8 [B, 3, S, S]`` -> ``boxes [B, A, 4]``,
    ``nms_scores [B, G, A]`` (G = 1 for class-agnostic NMS, the class count for per-class),
    ``conf [B, A]`` and ``class_id [B, A]`` (best non-background class), as ``decode_outputs`` before NMS."""

    def __init__(self, net: nn.Module, image_size: int, per_class: bool) -> None:
        super().__init__()
        self.net, self.per_class = net, per_class
        with torch.no_grad():
            anchors = net(torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device))[0]
        self.register_buffer("anchors", anchors.reshape(-1, 4).clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, cls_preds, bbox_preds = self.net(images.to(torch.float32))
        probs = F.softmax(cls_preds, dim=2)[:, :, 1:]
        conf, class_id = probs.max(dim=2)
        boxes = offset_inverse(self.anchors, bbox_preds.reshape(bbox_preds.shape[0], -1, 4))
        if self.per_class:  # each box competes only in its own class: its score there, 0 in the others
            nms_scores = F.one_hot(class_id, probs.shape[2]).to(conf.dtype) * conf.unsqueeze(2)
            nms_scores = nms_scores.permute(0, 2, 1)
        else:
            nms_scores = conf.unsqueeze(1)
        return boxes, nms_scores, conf, class_id


def export_onnx(detector: Detector, out: str | Path, threshold: float,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, str]:
    """Write ``detector`` (its net, image size, NMS threshold and mode) to ``out`` as the graph of the
    module docstring, atomically; returns the metadata written (``threshold``: the default score,
    ``max_image_pixels``: the largest image a consumer should decode)."""
    import onnx

    net = detector.net.eval().to("cpu")
    module = DecodedSSD(net, detector.image_size, detector.per_class).eval()
    model = _trace(module, detector.image_size)
    _append_nms(model, detector.nms_threshold, int(module.anchors.shape[0]))
    meta = metadata(detector, threshold, max_image_pixels)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return meta


def _trace(module: DecodedSSD, image_size: int) -> Any:
    """The graph before NMS (outputs :data:`_TRACED`, any batch size) as an ONNX ``ModelProto``.

    torch's TorchScript exporter, not its default ``torch.export`` one: the same graph in about 2 s
    instead of 15 to 30 s on 2 CPU cores, which every registered version pays (``ssd register`` exports
    it), and it needs no onnxscript. Deprecated since torch 2.9 but present in the pinned 2.14; if it
    goes, ``dynamo=True`` with ``dynamic_shapes`` (and onnxscript in the dependencies) is the change,
    and :func:`compare` checks either before a file is kept.
    """
    import onnx

    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)        # the exporter's own notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # the anchor cache's Python branch: constant here
        torch.onnx.export(module, (example,), buffer, input_names=[INPUT], output_names=list(_TRACED),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT, *_TRACED)}, opset_version=OPSET,
                          dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def metadata(detector: Detector, threshold: float, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, str]:
    """The model's settings as the ONNX file's metadata (:data:`META_KEYS` with :data:`META_PREFIX`, string values)."""
    block = describe(detector)
    values = {"image_size": block["image_size"], "classes": block["classes"], "nms_threshold": block["nms_threshold"],
              "nms": block["nms"], "threshold": threshold, "max_image_pixels": max_image_pixels, "model": block,
              "input": f"{INPUT}: uint8 [B, 3, S, S] RGB 0..255, resized to S x S (bilinear)",
              "outputs": "batch_index, class_id, score, box (x1, y1, x2, y2 as fractions of width and height)"}
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _append_nms(model: Any, nms_threshold: float, num_anchors: int) -> None:
    """Replace the graph's outputs with NMS over them and the rows it keeps (:data:`OUTPUTS`)."""
    from onnx import TensorProto, helper

    graph = model.graph
    boxes, nms_scores, conf, class_ids = (o.name for o in graph.output)
    const = [helper.make_tensor("ssd_max_boxes", TensorProto.INT64, [1], [num_anchors]),
             helper.make_tensor("ssd_iou", TensorProto.FLOAT, [1], [nms_threshold]),
             helper.make_tensor("ssd_score_floor", TensorProto.FLOAT, [1], [POS_THRESHOLD]),
             helper.make_tensor("ssd_cols", TensorProto.INT64, [2], [0, 2]),
             helper.make_tensor("ssd_col0", TensorProto.INT64, [], [0])]
    graph.initializer.extend(const)
    graph.node.extend([
        helper.make_node("NonMaxSuppression", [boxes, nms_scores, "ssd_max_boxes", "ssd_iou", "ssd_score_floor"],
                         ["ssd_selected"]),   # [K, 3]: image, NMS group, anchor
        helper.make_node("Gather", ["ssd_selected", "ssd_cols"], ["ssd_image_anchor"], axis=1),
        helper.make_node("Gather", ["ssd_selected", "ssd_col0"], [OUTPUTS[0]], axis=1),
        helper.make_node("GatherND", [class_ids, "ssd_image_anchor"], [OUTPUTS[1]]),
        helper.make_node("GatherND", [conf, "ssd_image_anchor"], [OUTPUTS[2]]),
        helper.make_node("GatherND", [boxes, "ssd_image_anchor"], [OUTPUTS[3]]),
    ])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(OUTPUTS[0], TensorProto.INT64, ["K"]),
                         helper.make_tensor_value_info(OUTPUTS[1], TensorProto.INT64, ["K"]),
                         helper.make_tensor_value_info(OUTPUTS[2], TensorProto.FLOAT, ["K"]),
                         helper.make_tensor_value_info(OUTPUTS[3], TensorProto.FLOAT, ["K", 4])])


def run_onnx(path: str | Path, images: torch.Tensor) -> list[torch.Tensor]:
    """Detections of a ``uint8 [B, 3, S, S]`` batch by the ONNX file, on onnxruntime's CPU: per
    image ``Tensor[K, 6]`` rows ``(class_id, score, x1, y1, x2, y2)``, best score first, as
    ``ssd.engine.inference.detect_raw`` gives them."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, class_id, score, box = session.run(list(OUTPUTS), {INPUT: images.numpy()})
    rows = torch.cat([torch.from_numpy(class_id).float()[:, None], torch.from_numpy(score)[:, None],
                      torch.from_numpy(box)], dim=1)
    batch = torch.from_numpy(batch)
    out = []
    for i in range(len(images)):
        mine = rows[batch == i]
        out.append(mine[mine[:, 1].argsort(descending=True, stable=True)])
    return out


def unmatched_rows(ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> int:
    """How many rows ``(class_id, score, x1, y1, x2, y2)`` of ``ours`` find no row of ``theirs`` with
    the same class and every value within ``atol`` (each row of ``theirs`` taken once, best scores
    first). Order is not compared: two rows whose scores tie (equal anchors on a flat background)
    come from PyTorch and onnxruntime in either order. NMS keeps no two rows of one class that close,
    so taking the first match never steals another row's."""
    free = torch.ones(len(theirs), dtype=torch.bool)
    missing = 0
    for row in ours:
        close = free & (theirs[:, 0] == row[0]) & ((theirs[:, 1:] - row[1:]).abs() <= atol).all(dim=1)
        hit = torch.nonzero(close)
        if len(hit):
            free[hit[0, 0]] = False
        else:
            missing += 1
    return missing


def compare(path: str | Path, detector: Detector, images: torch.Tensor, threshold: float,
            atol: float = ATOL) -> list[str]:
    """Where the ONNX file's detections above ``threshold`` differ from PyTorch's on ``images``:
    another count, or rows without a match (:func:`unmatched_rows`); empty when they agree."""
    ours = detect_raw(detector.net, images, detector.nms_threshold, per_class=detector.per_class)
    theirs = run_onnx(path, images)
    problems = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = a[a[:, 1] >= threshold], b[b[:, 1] >= threshold]
        if a.shape != b.shape:
            problems.append(f"image {i}: {len(a)} detections in PyTorch, {len(b)} in ONNX")
        elif missing := unmatched_rows(a, b, atol):
            problems.append(f"image {i}: {missing} of PyTorch's {len(a)} detections have no ONNX detection of "
                            f"their class within {atol:g}")
    return problems


def sample_images(count: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """``uint8 [count, 3, S, S]`` noise with a bright rectangle each: something for NMS to do."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 90, (count, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    for i in range(count):
        x, y = (torch.randint(0, image_size // 2, (2,), generator=generator)).tolist()
        images[i, :, y:y + image_size // 3, x:x + image_size // 3] = 200 + 10 * (i % 5)
    return images

