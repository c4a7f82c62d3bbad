"""``ssd predict``: detect objects in images with the registry's champion or a model file.

    ssd predict IMAGE_OR_FOLDER... [--model models:/tinyssd@champion | models/model.pt] [--threshold 0.9] [--out DIR]

Prints one JSON record per image (pixel boxes, class names, scores); with ``--out``, annotated
copies. An unreadable input is reported on stderr and skipped (exit 1 at the end).
"""
from __future__ import annotations

import argparse
import json
import sys

from ssd.engine.inference import predict_files
from ssd.mlops.registry import CHAMPION
from ssd.stages.common import add_params_arguments, load

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
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = load(args, PARAMS)
    evaluate, data = params["evaluate"], params["data"]
    model = args.model or f"models:/{params['registry']['model_name']}@{CHAMPION}"
    threshold = args.threshold if args.threshold is not None else evaluate["threshold"]
    failed: list[str] = []

    def report(message: str) -> None:
        failed.append(message)
        print(f"ssd predict: skipped {message}", file=sys.stderr, flush=True)

    results = predict_files(args.images, model, threshold, args.out,
                            image_size=data["image_size"], nms_threshold=evaluate["nms_threshold"],
                            max_pixels=data["max_image_pixels"], on_error=report, device=args.device,
                            per_class=evaluate["nms"] == "per_class")
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if failed:
        print(f"ssd predict: error: {len(failed)} input(s) skipped, {len(results)} image(s) predicted",
              file=sys.stderr)
        return 1
    return 0
