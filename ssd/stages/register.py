"""``ssd register``: log the model to MLflow, register it, move ``challenger`` (and maybe ``champion``).

Safe to run twice; the registry operations and the promotion rule: ``ssd.mlops.registry``.
``reports/registration.json`` records the version, the aliases and the decision.
"""
from __future__ import annotations

import argparse
import json

from ssd.data.layout import EVAL_FILE, MODEL_FILE, RAW_DIR, REGISTRATION_FILE, RUN_FILE
from ssd.mlops.registry import register
from ssd.stages.common import add_params_arguments, load

PARAMS = ("registry", "evaluate.threshold", "evaluate.nms_threshold", "evaluate.nms", "data.image_size",
          "data.max_image_pixels", "data.classes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(MODEL_FILE), help="model file (default: %(default)s)")
    parser.add_argument("--eval", default=str(EVAL_FILE), help="evaluation metrics (default: %(default)s)")
    parser.add_argument("--run-file", default=str(RUN_FILE), help="the training's MLflow run (default: %(default)s)")
    parser.add_argument("--out", default=str(REGISTRATION_FILE), help="record (default: %(default)s)")
    parser.add_argument("--data", default=str(RAW_DIR), help="the data, for its validation split (default: %(default)s)")
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    record = register(load(args, PARAMS), args.model, args.eval, args.run_file, args.out, args.data)
    print(json.dumps(record, indent=2))
    return 0
