"""``ssd train``: train TinySSD; the same entry point under ``python`` and ``torchrun``.

    torchrun --standalone --nproc-per-node 4 -m ssd train      # one machine, 4 processes
    ssd train -S train.epochs=2                                 # one process

The loop, checkpoints and resume: ``ssd.engine.loop``. This stage adds the MLflow run (rank 0 only):
it starts or resumes the run the checkpoints name, and hands it to the loop as its run log.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ssd.data.layout import (CHECKPOINT_DIR, DATASET_ROOT, MODEL_FILE, RUN_FILE, TRAIN_CURVE, TRAIN_HISTORY,
                             TRAIN_METRICS)
from ssd.engine import distributed as dist
from ssd.engine.loop import TrainPaths, finish, fit, resume, workspace_lock
from ssd.engine.setup import build, run_tags
from ssd.mlops.provenance import provenance
from ssd.mlops.tracking import ensure_reachable, tracking_uri
from ssd.mlops.training_run import EXPERIMENT, Tracker, run_name
from ssd.stages import common
from ssd.util.errors import Interrupted
from ssd.util.settings import Settings

PARAMS = ("base", "data.classes", "data.image_size", "data.max_image_pixels", "data.max_boxes_per_image", "data.max_label_line_bytes", "data.max_label_rows",
          "data.loader", "model", "train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_params_arguments(parser)
    parser.add_argument("--data", type=Path, default=DATASET_ROOT, help="dataset root (default: %(default)s)")
    parser.add_argument("--model-out", type=Path, default=MODEL_FILE)
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--run-file", type=Path, default=RUN_FILE)
    parser.add_argument("--metrics-out", type=Path, default=TRAIN_METRICS)
    parser.add_argument("--history-out", type=Path, default=TRAIN_HISTORY)
    parser.add_argument("--curve-out", type=Path, default=TRAIN_CURVE)
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")


def run(args: argparse.Namespace) -> int:
    settings = common.settings(args, PARAMS)
    paths = TrainPaths(data=args.data, model_out=args.model_out, checkpoint_dir=args.checkpoint_dir,
                       run_file=args.run_file, metrics_out=args.metrics_out, history_out=args.history_out,
                       curve_out=args.curve_out, experiment=args.experiment, fresh=args.fresh)
    info = dist.init_distributed()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        uri = ensure_reachable(tracking_uri()) if info.is_main else ""  # before any file or training time
        with workspace_lock(paths.checkpoint_dir, info):
            train(settings, paths, info, uri)
    finally:  # leave the process as it was (tests call this in-process)
        torch.use_deterministic_algorithms(deterministic)
        dist.destroy_distributed()
    return 0


def train(settings: Settings, paths: TrainPaths, info: dist.DistInfo, uri: str) -> dict[str, Any]:
    """The whole stage, tracked in MLflow at ``uri`` (rank 0); returns the final metrics (on every rank)."""
    setup = build(settings, paths.data, info)
    progress = resume(setup, paths)
    origin = provenance(paths.data) if info.is_main else {}  # hashes the data: rank 0 only
    tracker = Tracker(info.is_main)
    tracker.start(uri=uri, experiment=paths.experiment, run_id=progress.run_id,
                  run_name=run_name(origin.get("git_commit", "unknown")), params=setup.params,
                  tags={**origin, **run_tags(setup)}, data=paths.data)
    try:
        tracker.backfill(progress.history)  # epochs a stopped run checkpointed but never logged
        fit(setup, progress, paths, tracker)
        final = finish(setup, progress, paths, tracker, origin)
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, Interrupted) else "FAILED")
        raise
    tracker.end()
    return final
