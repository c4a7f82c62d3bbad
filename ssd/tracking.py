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


# ----------------------------------------------------------------------------------------------
# What a run records about where it came from (used by training; evaluation may reuse it).

def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.2}}`` -> ``{"train.lr": "0.2"}``; lists stay one value (``"[1, 2, 0.5]"``)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def git_commit(cwd: str | Path = ".") -> str:
    """The checked-out commit (``+dirty`` when tracked files differ), or ``unknown`` outside git."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def dataset_tags(raw_dir: str | Path = "data/raw", dvc_lock: str | Path = "dvc.lock") -> dict[str, str]:
    """``data_hash`` (DVC's md5 of ``raw_dir`` from dvc.lock, else the archive SHA-1 in the
    manifest) and ``data_source`` (``d2l``, ``synthetic``, ... from ``raw_dir/manifest.json``)."""
    import yaml

    raw_dir = Path(raw_dir)
    tags = {"data_hash": "unknown", "data_source": "unknown"}
    manifest_path = raw_dir / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            tags["data_source"] = str(manifest.get("resolved_source", "unknown"))
            if manifest.get("synthetic_fallback"):
                tags["data_synthetic_fallback"] = "true"
            if manifest.get("sha1"):
                tags["data_hash"] = f"sha1:{manifest['sha1']}"
        except (OSError, ValueError):
            pass
    if Path(dvc_lock).is_file():
        try:
            lock = yaml.safe_load(Path(dvc_lock).read_text()) or {}
            for out in (lock.get("stages", {}).get("fetch", {}) or {}).get("outs", []) or []:
                if Path(out.get("path", "")) == raw_dir and out.get("md5"):
                    tags["data_hash"] = f"dvc-md5:{out['md5']}"
        except (OSError, ValueError, AttributeError):
            pass
    return tags


def start_or_resume_run(uri: str, experiment: str, run_id: str | None = None) -> tuple[Any, bool]:
    """Make ``run_id``'s run active again when the store has it, else start a new run in ``experiment``.

    Returns ``(active mlflow run, resumed)``. The caller ends it (``mlflow.end_run``).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    if run_id:
        try:
            mlflow.MlflowClient(uri).get_run(run_id)
            return mlflow.start_run(run_id=run_id), True
        except MlflowException:
            import warnings

            warnings.warn(f"MLflow run {run_id} is not in {uri}; starting a new run", stacklevel=2)
    mlflow.set_experiment(experiment)
    return mlflow.start_run(), False
