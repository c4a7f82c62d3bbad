"""``ssd train``: train TinySSD; the same entry point under ``python`` and ``torchrun``.

    torchrun --standalone --nproc-per-node 4 -m ssd train      # one machine, 4 processes
    ssd train -S train.epochs=2                                 # one process

The loop, checkpoints and resume: ``ssd.engine.loop``. Only rank 0 writes files and talks to MLflow.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ssd.data.layout import (CHECKPOINT_DIR, DATASET_ROOT, MODEL_FILE, RUN_FILE, TRAIN_CURVE, TRAIN_HISTORY,
                             TRAIN_METRICS)
from ssd.engine import distributed as dist
from ssd.engine.loop import train, workspace_lock
from ssd.mlops.tracking import EXPERIMENT, ensure_reachable, tracking_uri
from ssd.stages.common import add_params_arguments, load

PARAMS = ("base", "data.classes", "data.image_size", "data.max_image_pixels", "model", "train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
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
    params = load(args, PARAMS)
    info = dist.init_distributed()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        uri = ensure_reachable(tracking_uri()) if info.is_main else ""  # before any file or training time
        with workspace_lock(args.checkpoint_dir, info):
            train(params, args, info, uri)
    finally:  # leave the process as it was (tests call this in-process)
        torch.use_deterministic_algorithms(deterministic)
        dist.destroy_distributed()
    return 0
