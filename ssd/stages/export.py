"""``ssd export``: a model as one ONNX file that runs on onnxruntime without torch.

    ssd export [--model models:/tinyssd@champion | models:/tinyssd/3 | runs:/ID/model | model.pt] --out model.onnx

The model is loaded as ``ssd predict`` loads it (weights and settings, no stored code:
``ssd.mlops.models``; its own image size, classes and NMS, ``ssd.stages.model_params``). The graph
(``ssd.engine.onnx_export``) takes ``uint8`` images and returns the detections after NMS; the settings
and the model's name, version and run are in its metadata. Before the file is kept, onnxruntime's
detections on generated images are compared with PyTorch's (``ssd.engine.onnx_export.compare``:
every row NMS keeps, within ``ATOL``): a difference fails the command and nothing is written.
Prints the metadata written as JSON. ``ssd register`` logs the same file with every version
(``ssd.mlops.onnx_artifact``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from ssd.mlops.models import URI_FORMS
from ssd.mlops.records import CHAMPION
from ssd.stages import common, model_params
from ssd.util.files import atomic_path

PARAMS = ("evaluate.threshold", "evaluate.nms_threshold", "evaluate.nms", "data.image_size", "data.max_image_pixels",
          "registry.model_name")
CHECK_IMAGES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f"{URI_FORMS} (default: models:/<registry.model_name>@{CHAMPION})")
    parser.add_argument("--out", required=True, help="the ONNX file to write")
    common.add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ssd.engine.onnx_export import ATOL, compare, export_onnx, sample_images

    detector, settings = model_params.open_detector(args, PARAMS, "export", "cpu")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="ssd-export-") as tmp:
        candidate = Path(tmp) / out.name
        with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines: stdout is for the JSON
            meta = export_onnx(detector, candidate, settings.evaluate.threshold, settings.data.max_image_pixels)
        problems = compare(candidate, detector, sample_images(CHECK_IMAGES, detector.image_size), 0.0, ATOL)
        if problems:
            raise RuntimeError(f"{detector.source.uri}: the ONNX graph does not give PyTorch's detections "
                               f"({'; '.join(problems)}): {out} not written")
        with atomic_path(out) as final:
            final.write_bytes(candidate.read_bytes())
    print(json.dumps({"onnx": str(out), "bytes": out.stat().st_size, **meta}, indent=2))
    return 0
