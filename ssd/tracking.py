"""Where MLflow lives, and the one MLflow run a pipeline execution logs into.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), else the
embedded SQLite store ``sqlite:///mlflow.db`` in the working directory (a laptop). The training
stage starts the run and writes its id to ``RUN_FILE``; evaluation and registration read that file
and log into the same run.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .files import atomic_write_json

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_FILE = Path("models/mlflow_run.json")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def ensure_reachable(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast, before any training time is spent, if an HTTP tracking server does not answer.

    Returns the URI. File and database URIs need no server and are returned as they are.
    """
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                               f"(`mlflow server --host 127.0.0.1 ...`) or unset MLFLOW_TRACKING_URI") from None
    return uri


def write_run_file(run_id: str, uri: str, path: str | Path = RUN_FILE, **extra: Any) -> None:
    atomic_write_json(path, {"run_id": run_id, "tracking_uri": uri, **extra})


def read_run_file(path: str | Path = RUN_FILE) -> dict[str, Any]:
    """``{"run_id", "tracking_uri", ...}`` written by the training stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train stage first (it starts the MLflow run)")
    info = json.loads(path.read_text())
    if "run_id" not in info:
        raise ValueError(f"{path}: no run_id")
    return info
