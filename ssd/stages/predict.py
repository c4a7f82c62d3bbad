"""``ssd predict``: detect objects in images with the registry's champion or a model file.

    ssd predict IMAGE_OR_FOLDER... [--model models:/tinyssd@champion | models/model.pt] [--threshold 0.9] [--out DIR]

Prints one JSON record per image (pixel boxes, class names, scores: ``ssd.engine.prediction``);
with ``--out``, annotated copies. A model URI is loaded from MLflow (``ssd.mlops.models``) with the
settings it was registered with; a model file with the params'. An unreadable input is reported on
stderr and skipped (exit 1 at the end).
"""
from __future__ import annotations

import argparse
import json
import sys

from ssd.engine.inference import PER_CLASS_NMS
from ssd.engine.prediction import predict_files
from ssd.mlops.models import load_detector
from ssd.mlops.records import CHAMPION
from ssd.stages import common

PARAMS = ("evaluate.threshold", "evaluate.nms_threshold", "evaluate.nms", "data.image_size",
          "data.max_image_pixels", "registry.model_name")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (any size, mode or format) or folders of them")
    parser.add_argument("--model", default=None,
                        help=f"MLflow model URI or a model.pt file (default: models:/<registry.model_name>@{CHAMPION})")
    parser.add_argument("--threshold", type=float, default=None,
                        help="minimum score of a reported box (default: params evaluate.threshold)")
    parser.add_argument("--out", default=None, help="folder for annotated images (default: none written)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = common.settings(args, PARAMS)
    evaluate, data = settings.evaluate, settings.data
    model = args.model or f"models:/{settings.registry.model_name}@{CHAMPION}"
    threshold = args.threshold if args.threshold is not None else evaluate.threshold
    failed: list[str] = []

    def report(message: str) -> None:
        failed.append(message)
        print(f"ssd predict: skipped {message}", file=sys.stderr, flush=True)

    detector = load_detector(model, data.image_size, evaluate.nms_threshold, args.device)
    results = predict_files(args.images, detector, threshold, args.out, max_pixels=data.max_image_pixels,
                            on_error=report, per_class=evaluate.nms == PER_CLASS_NMS)
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if failed:
        print(f"ssd predict: error: {len(failed)} input(s) skipped, {len(results)} image(s) predicted",
              file=sys.stderr)
        return 1
    return 0
