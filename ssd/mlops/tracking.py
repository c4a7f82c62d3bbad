"""Where MLflow lives, and the one MLflow run a pipeline execution logs into.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), else the
embedded SQLite store ``sqlite:///mlflow.db`` in the working directory (a laptop). The training
stage starts the run and writes its id to ``RUN_FILE``; evaluation and registration read that file
and log into the same run.

:func:`client` is every stage's ``MlflowClient`` (a reachable server checked first, MLflow's HTTP
retries bounded); the evaluation is logged into the training's run (:func:`log_evaluation`);
:func:`is_missing` says what an MLflow error means (``ssd.util.errors.is_transient`` the rest). The
training's own run (:class:`~ssd.mlops.training_run.Tracker`) is ``ssd.mlops.training_run``. ``ssd.mlops.registry`` keeps
the registry's own operations (versions, aliases, the logged model), through :func:`client`; what a
run records about where it came from (git commit, data hashes) is ``ssd.mlops.provenance``.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

from ssd.data.layout import RUN_FILE
from ssd.util.errors import TransientError
from ssd.util.files import atomic_write_json

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EVALUATION_ARTIFACTS = "evaluation"                   # the evaluate stage's files in the training's run
EVALUATION_PICTURES = f"{EVALUATION_ARTIFACTS}/pictures"  # its pictures (layout.GALLERY_PICTURE among them)
# MLflow's own HTTP retries, unless the environment sets them: its defaults (7 retries, backoff
# factor 2, 120 s timeout) keep a failing server's stage silent for minutes. With these a request
# that keeps failing gives up after about 3 s (retries after 0 s and 2 s, plus jitter); the flow
# then retries the whole stage later (exit 75).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


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
            raise TransientError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                               f"(`mlflow server --host 127.0.0.1 ...`) or unset MLFLOW_TRACKING_URI") from None
    return uri


def bound_http_retries() -> None:
    """Set ``HTTP_DEFAULTS`` for this process where the environment does not set them (MLflow reads
    them at every request)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for tracking and registry at ``uri`` (default :func:`tracking_uri`).

    An HTTP server is checked first (:func:`ensure_reachable`: ``TransientError`` in seconds when it
    does not answer) and MLflow's HTTP retries are bounded (:func:`bound_http_retries`).
    """
    uri = ensure_reachable(uri)  # before importing MLflow: a dead server is reported in a second
    bound_http_retries()
    import mlflow

    mlflow.set_tracking_uri(uri)  # for the fluent calls made with this client (log_model, load_model)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_missing(exc: BaseException) -> bool:
    """Whether an MLflow error says the thing asked for does not exist (``RESOURCE_DOES_NOT_EXIST``,
    HTTP 404): the only error that may be read as "none"."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


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
# Later stages: the training's run, read and logged into through a client.

class TrainingRun(NamedTuple):
    client: Any              # MlflowClient
    run_id: str
    tags: dict[str, str]


def training_run(run_file: str | Path = RUN_FILE) -> TrainingRun | None:
    """The training's run named in ``run_file``, or None (with a
    warning on stderr) when there is no such file, or the store it names does not have the run (a
    clone that ``dvc pull``-ed the model but not the store). Any other MLflow error propagates."""
    import sys

    if not Path(run_file).is_file():
        print(f"warning: {run_file} not found (no training run): skipped MLflow logging", file=sys.stderr)
        return None
    info = read_run_file(run_file)
    found = client(info["tracking_uri"])
    try:
        run = found.get_run(info["run_id"])
    except Exception as exc:
        if not is_missing(exc):
            raise
        print(f"warning: MLflow run {info['run_id']} (from {run_file}) is not in {info['tracking_uri']}: "
              f"skipped MLflow logging", file=sys.stderr)
        return None
    return TrainingRun(found, info["run_id"], dict(run.data.tags))


def log_evaluation(run: TrainingRun, metrics: dict[str, Any], paths: dict[str, Path]) -> None:
    """Log the evaluate stage's metrics (as ``val_*``) and report files (under ``evaluation/``) into
    the training's run (:func:`training_run`)."""
    import time

    from mlflow.entities import Metric

    found, run_id = run.client, run.run_id
    now = int(time.time() * 1000)
    found.log_batch(run_id, metrics=[Metric(f"val_{k}", float(v), now, 0)
                                     for k, v in metrics.items() if isinstance(v, (int, float))])
    found.log_artifact(run_id, str(paths["metrics"]), EVALUATION_ARTIFACTS)
    found.log_artifact(run_id, str(paths["pr_curve"]), EVALUATION_ARTIFACTS)
    found.log_artifacts(run_id, str(paths["pictures"]), EVALUATION_PICTURES)
