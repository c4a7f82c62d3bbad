"""``ssd evaluate``: mAP, precision/recall, per-class AP, confusion and pictures on the validation split.

Metrics and pictures: ``ssd.engine.evaluation``. Written under ``reports/`` and logged into the
training's MLflow run (``models/mlflow_run.json``).
"""
from __future__ import annotations

import argparse

from ssd.data.layout import DATASET_ROOT, MODEL_FILE, REPORTS, RUN_FILE
from ssd.engine.evaluation import evaluate
from ssd.stages.common import add_params_arguments, load

PARAMS = ("evaluate", "data.classes", "data.image_size", "data.max_image_pixels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(MODEL_FILE), help="model file (default: %(default)s)")
    parser.add_argument("--data", default=str(DATASET_ROOT), help="dataset root (default: %(default)s)")
    parser.add_argument("--reports", default=str(REPORTS), help="reports folder (default: %(default)s)")
    parser.add_argument("--run-file", default=str(RUN_FILE), help="the training's MLflow run (default: %(default)s)")
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    metrics = evaluate(load(args, PARAMS), args.model, args.data, args.reports, args.run_file)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
                   if isinstance(v, (int, float))))
    for name, values in metrics["per_class"].items():
        print(f"  {name}: ap50={values['ap50']:.4g} ap={values['ap']:.4g} objects={values['num_objects']}")
    for pair in metrics["confusion"]["confused"]:
        print(f"  {pair['truth']} taken for {pair['predicted']}: {pair['count']} ({pair['fraction']:.0%})")
    return 0
