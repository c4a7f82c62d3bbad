"""``ssd predict``: detect objects in images with the registry's champion or a model file, from any folder.

    ssd predict IMAGE_OR_FOLDER... [--model models:/tinyssd@champion | models:/tinyssd/3 | runs:/ID/model | model.pt]
                [--threshold 0.9] [--device cpu] [--out DIR]

A registered model is loaded as its weights and settings, never as code (``ssd.mlops.models``); it
and a model file detect with their own settings (image size, classes, NMS threshold and mode:
``ssd.stages.model_params``), so no params file is needed; an explicit param that contradicts the
model is refused. Prints one JSON record per image (pixel boxes, class names, scores and a ``model``
block naming the model: ``ssd.engine.prediction``); with ``--out``, annotated copies. An unreadable
input is reported on stderr and skipped (exit 1 at the end).
"""
from __future__ import annotations

import argparse
import json
import sys

from ssd.engine.prediction import predict_files
from ssd.mlops.models import URI_FORMS
from ssd.mlops.records import CHAMPION
from ssd.stages import common, model_params
from ssd.util.settings import SCHEMA

PARAMS = ("evaluate.threshold", "evaluate.nms_threshold", "evaluate.nms", "data.image_size",
          "data.max_image_pixels", "registry.model_name")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (any size, mode or format) or folders of them")
    parser.add_argument("--model", default=None,
                        help=f"{URI_FORMS} (default: models:/<registry.model_name>@{CHAMPION})")
    parser.add_argument("--threshold", type=float, default=None,
                        help="minimum score of a reported box (default: the model's, else evaluate.threshold)")
    parser.add_argument("--out", default=None, help="folder for annotated images (default: none written)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.threshold is not None and not SCHEMA["evaluate.threshold"].ok(args.threshold):
        raise ValueError(f"--threshold {args.threshold}: expected {SCHEMA['evaluate.threshold'].expected}")
    detector, settings = model_params.open_detector(args, PARAMS, "predict", args.device)
    threshold = args.threshold if args.threshold is not None else settings.evaluate.threshold
    failed: list[str] = []

    def report(message: str) -> None:
        failed.append(message)
        print(f"ssd predict: skipped {message}", file=sys.stderr, flush=True)

    results = predict_files(args.images, detector, threshold, args.out, max_pixels=settings.data.max_image_pixels,
                            on_error=report)
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if failed:
        print(f"ssd predict: error: {len(failed)} input(s) skipped, {len(results)} image(s) predicted",
              file=sys.stderr)
        return 1
    return 0
