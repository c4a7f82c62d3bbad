"""A detector named by an MLflow model URI (``models:/tinyssd@champion``, ``runs:/<id>/model``) or a model file."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ssd.engine import inference
from ssd.engine.inference import Detector, best_device
from ssd.mlops.tracking import tracking_uri


def is_model_uri(model: str | Path) -> bool:
    """``models:/...``, ``runs:/...``, ``file://...`` and the like, as opposed to a file path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(model)))


def load_detector(model: str | Path, image_size: int = 256, nms_threshold: float = 0.5,
                  device: str | torch.device | None = None) -> Detector:
    """A TinySSD from an MLflow model URI or a model file.

    A model file gets the ``image_size`` and ``nms_threshold`` passed in; an MLflow model
    carries its own (``ssd.mlops.pyfunc``). The net is on ``device`` (default
    :func:`ssd.engine.inference.best_device`). A missing file or model raises ``FileNotFoundError`` /
    ``RuntimeError`` naming it.
    """
    if not is_model_uri(model):
        return inference.load_detector(model, image_size, nms_threshold, device)
    device = best_device(device)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(str(model))
    except MlflowException as exc:
        raise RuntimeError(f"cannot load model {model} from {tracking_uri()}: {exc.message}") from None
    detector = loaded.unwrap_python_model()
    return Detector(detector.net.to(device), detector.image_size, detector.nms_threshold)
