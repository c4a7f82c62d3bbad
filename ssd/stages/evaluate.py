"""``ssd evaluate``: mAP, precision/recall, per-class AP, confusion and pictures on the validation split.

Scoring and reports: ``ssd.engine.evaluation`` (the metrics: ``ssd.engine.metrics``; the pictures:
``ssd.engine.figures``). Written under ``reports/`` (``eval.json`` with a ``provenance`` block: the
training run's, ``ssd.mlops.provenance``, computed now only for a model without a run) and logged
into the training's MLflow run (``models/mlflow_run.json``) as ``val_*`` metrics and ``evaluation/``
artifacts. Without that run the reports are still written and MLflow logging is skipped with a
warning, so the stage can be run on a model that came from elsewhere. The split is streamed (images
decoded batch by batch, ``ssd.engine.evaluation.score``); its rate, in images/s, goes to stderr.

The model file's own settings (the image size it was trained at, its classes, and its recipe's NMS
settings: ``ssd.core.recipe``) are the ones scored with: an explicit param that contradicts them is
refused, ``params.yaml``'s value is replaced with a note (``ssd.stages.model_params``). A model of the
``photos`` recipe gets its display threshold (precision, recall, gallery) from the validation
precision-recall curve, the point of best F1, unless ``evaluate.threshold`` is given explicitly;
eval.json then says so (``threshold_from``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ssd.core.model import ModelFile, TinySSD, read_model
from ssd.core.recipe import picks_threshold
from ssd.data.layout import DATASET_ROOT, MODEL_FILE, REPORTS, RUN_FILE
from ssd.engine.evaluation import load_validation, score, write_reports
from ssd.engine.figures import report_figures
from ssd.engine.metrics import CURVE_THRESHOLDS, best_f1, flat_per_class, precision_recall
from ssd.mlops.models import file_settings
from ssd.mlops.provenance import provenance, run_provenance
from ssd.mlops.tracking import log_evaluation, training_run
from ssd.stages import common, model_params
from ssd.util.settings import Settings

PARAMS = ("evaluate", "data.classes", "data.image_size", "data.max_image_pixels", "data.max_boxes_per_image",
          "data.max_label_line_bytes", "data.max_label_rows")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_path_options(parser, model=(MODEL_FILE, "model file"), data=(DATASET_ROOT, "dataset root"),
                            reports=(REPORTS, "reports folder"), run_file=(RUN_FILE, "the training's MLflow run"))
    common.add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    given = model_params.given_params(args, PARAMS)  # a bad param is reported before the model is read
    # A missing file is reported by evaluate(), after the tracking server is checked (exit 75 first).
    file = read_model(args.model) if Path(args.model).is_file() else None
    model = file_settings(file) if file else {}
    settings, notes = model_params.resolve(given, PARAMS, model, args.model)
    for note in notes:
        print(f"ssd evaluate: note: {note}", file=sys.stderr)
    pick = file is not None and picks_threshold(file.recipe) and "evaluate.threshold" not in given.explicit
    metrics = evaluate(settings, args.model, args.data, args.reports, args.run_file, pick_threshold=pick)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
                   if isinstance(v, (int, float))))
    for name, values in metrics["per_class"].items():
        print(f"  {name}: ap50={values['ap50']:.4g} ap={values['ap']:.4g} objects={values['num_objects']}")
    for pair in metrics["confusion"]["confused"]:
        print(f"  {pair['truth']} taken for {pair['predicted']}: {pair['count']} ({pair['fraction']:.0%})")
    return 0


def evaluate(settings: Settings, model_path: str | Path = MODEL_FILE, data_root: str | Path = DATASET_ROOT,
             reports: str | Path = REPORTS, run_file: str | Path = RUN_FILE, *,
             pick_threshold: bool = False) -> dict[str, Any]:
    """The whole stage with the settings of :data:`PARAMS`: metrics, curve and pictures written under
    ``reports``, logged to MLflow; returns the metrics (``eval.json`` without its provenance).
    ``pick_threshold``: the display threshold is the curve's point of best F1, not ``evaluate.threshold``."""
    run = training_run(run_file)  # first: an unreachable server fails the stage before any scoring
    # The model's provenance is its training run's (the same tags as on the run and the version);
    # only a model that came from elsewhere, with no run, gets the checkout's and data's.
    origin = run_provenance(run.tags) if run else provenance(data_root)
    cfg = settings.evaluate
    net = _checked_model(read_model(model_path), settings, model_path)
    dataset = load_validation(settings.data, data_root)
    scores = score(net, dataset, cfg)
    print(f"evaluate: {len(dataset)} images in {scores.seconds:.1f} s ({scores.images_per_s:.0f} images/s, "
          f"{scores.workers} decode worker(s))", file=sys.stderr)
    metrics = scores.metrics
    curve = precision_recall(scores.pixel_preds, scores.pixel_targets, CURVE_THRESHOLDS)
    threshold = float(cfg.threshold)
    if pick_threshold:
        point = best_f1(curve)
        threshold = point["threshold"]
        metrics = {**metrics, "threshold": threshold, "precision": point["precision"], "recall": point["recall"],
                   "threshold_from": "best F1 on the validation precision-recall curve"}
    with report_figures(dataset, scores.preds, scores.pixel_targets, metrics["confusion"], curve, threshold,
                        cfg.gallery_images) as figures:
        paths = write_reports(Path(reports), {**metrics, "provenance": origin}, curve, figures)
    if run:
        log_evaluation(run, {**metrics, **flat_per_class(metrics["per_class"])}, paths)
    return metrics


def _checked_model(model: ModelFile, settings: Settings, path: str | Path) -> TinySSD:
    """The model's net, if ``settings`` score it as it was trained (image size, classes); else a one-line refusal."""
    trained = {**file_settings(model)}
    given = {"data.image_size": settings.data.image_size, "data.classes": list(settings.data.classes)}
    for key, value in given.items():
        if key in trained and trained[key] != value:
            raise ValueError(f"{path} has {key}={trained[key]!r}, the settings {value!r}: it would be scored "
                             f"as it was not trained")
    return model.net
