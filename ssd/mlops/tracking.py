"""Where MLflow lives, and the one MLflow run a pipeline execution logs into.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), else the
embedded SQLite store ``sqlite:///mlflow.db`` in the working directory (a laptop). The training
stage starts the run and writes its id to ``RUN_FILE``; evaluation and registration read that file
and log into the same run.

This is the one module that talks to MLflow's tracking API: :func:`client` (every stage's
``MlflowClient``: a reachable server checked first, MLflow's HTTP retries bounded), the training's
run (:class:`Tracker`, which owns its run: MLflow's fluent API, so the run carries MLflow's
context tags and dataset inputs), the evaluation logged into that run (:func:`log_evaluation`),
and what an MLflow error means (:func:`is_missing`; ``ssd.util.errors.is_transient``). ``ssd.mlops.registry`` keeps
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
from ssd.mlops.provenance import PROVENANCE_KEYS, data_folder, data_source, dvc_md5, read_manifest
from ssd.util.errors import TransientError
from ssd.util.files import atomic_write_json

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "tinyssd"  # the MLflow experiment training runs go to (`ssd train --experiment`)
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
# The training's run: params, tags, dataset inputs, metrics per epoch, checkpoints.

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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def run_name(commit: str, now: Any = None) -> str:
    """``train-[<DVC experiment>-]<short commit>-<UTC time>``, e.g. ``train-a57f6e5-20250101T120000Z``;
    ``dvc exp run`` names its experiment in ``DVC_EXP_NAME``."""
    from datetime import datetime, timezone

    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    experiment = os.environ.get("DVC_EXP_NAME")
    return "-".join(["train", *([experiment] if experiment else []), commit[:7], stamp])


def log_dataset_inputs(dataset_root: str | Path, skip: frozenset[str] = frozenset()) -> None:
    """Log the training and validation splits as the active run's dataset inputs (contexts
    ``training`` and ``validation``, less those in ``skip``): name = the split's folder, digest =
    DVC's md5 of that folder, source = :func:`data_source` (HTTP URL, local path, or code for
    generated data)."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    from ssd.data.labels import find_split

    folder = data_folder(dataset_root)
    manifest = read_manifest(folder)
    source_text = data_source(manifest, folder)
    if source_text.startswith(("http://", "https://")):
        source = HTTPDatasetSource(source_text)
    elif source_text.startswith("synthetic:"):
        settings = {k: str(v) for k, v in (manifest.get("synthetic") or {}).items()}
        source = CodeDatasetSource({"generator": "ssd.data.synthetic", **settings})
    else:
        source = LocalArtifactDatasetSource(source_text)
    hashes = dvc_md5(folder)
    datasets, contexts = [], []
    for context, split in (("training", "train"), ("validation", "val")):
        if context in skip:
            continue
        try:
            split_dir = find_split(dataset_root, split).resolve()
        except FileNotFoundError:
            continue
        digest = hashes[split_dir.relative_to(folder.resolve()).as_posix()]
        datasets.append(MetaDataset(source, name=split_dir.name, digest=digest))
        contexts.append(context)
    if datasets:
        mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=[None] * len(datasets))


def _input_contexts(run: Any) -> frozenset[str]:
    """The contexts (``training``, ``validation``) of the dataset inputs ``run`` already lists."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = run.inputs.dataset_inputs if run.inputs else []
    return frozenset(tag.value for entry in inputs for tag in entry.tags if tag.key == MLFLOW_DATASET_CONTEXT)


def start_or_resume_run(uri: str, experiment: str, run_id: str | None = None,
                        run_name: str | None = None) -> tuple[Any, bool]:
    """Make ``run_id``'s run active again (its name unchanged) when the store has it, else start a
    new run named ``run_name`` in ``experiment``.

    Returns ``(active mlflow run, resumed)``. The caller ends it (``mlflow.end_run``).
    """
    import mlflow

    store = client(uri)
    if run_id:
        try:
            store.get_run(run_id)
            return mlflow.start_run(run_id=run_id), True
        except Exception as exc:
            if not is_missing(exc):  # a failing server is not a missing run: no second run for one model
                raise
            import warnings

            warnings.warn(f"MLflow run {run_id} is not in {uri}; starting a new run", stacklevel=2)
    _create_experiment(store, uri, experiment)
    found = mlflow.set_experiment(experiment)
    if EXPERIMENT_KIND_TAG not in found.tags:
        # MLflow 3's UI opens an experiment of unknown kind on its GenAI traces overview (empty here);
        # this tag makes it open on the training runs, with their datasets and model versions.
        store.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return mlflow.start_run(run_name=run_name), False


def _create_experiment(store: Any, uri: str, experiment: str) -> None:
    """Create ``experiment`` if missing; with a local SQLite store its artifacts go beside the database.

    MLflow's own default is ``./mlruns`` of whichever folder first creates the experiment: a flow
    run's temporary workspace would take the artifacts away with it.
    """
    if store.get_experiment_by_name(experiment) is not None:
        return
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns" / experiment).as_uri()
    try:
        store.create_experiment(experiment, artifact_location=location)
    except Exception as exc:  # another process created it first: that one is used
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
            raise


class Tracker:
    """The pipeline's MLflow run, on rank 0 only (every method is a no-op elsewhere)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.run_id = ""

    def start(self, *, uri: str, experiment: str, run_id: str | None, run_name: str, params: dict[str, Any],
              tags: dict[str, str], data: Path) -> None:
        if not self.active:
            return
        import mlflow

        run, resumed = start_or_resume_run(uri, experiment, run_id, run_name)
        self.run_id = run.info.run_id
        if not resumed:  # params are immutable in MLflow; a resumed run already has them
            mlflow.log_params(flatten_params(params))
            mlflow.set_tags(tags)
            log_dataset_inputs(data)
        else:
            # The weights go on from the commit and data the run started with (its name says so):
            # provenance tags and dataset inputs stay those; once a resume retagged the run.
            started = run.data.tags
            mlflow.set_tags({k: v for k, v in tags.items() if k not in PROVENANCE_KEYS or k not in started})
            log_dataset_inputs(data, skip=_input_contexts(run))
        self.uri, self.experiment = uri, experiment

    def write_run_file(self, path: Path) -> None:
        """Name the run beside the model it made (written with the model, so the two always match)."""
        if self.active:
            write_run_file(self.run_id, self.uri, path, experiment=self.experiment)

    def log_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Path) -> None:
        if not self.active:
            return
        import shutil
        import tempfile

        import mlflow

        mlflow.log_metrics(metrics, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:  # one artifact, always the latest checkpoint
            shutil.copy(checkpoint, Path(tmp) / "last.pt")
            mlflow.log_artifact(str(Path(tmp) / "last.pt"), artifact_path="checkpoints")
        mlflow.set_tag("checkpoint_epoch", str(epoch))

    def backfill(self, history: list[dict[str, float]]) -> None:
        """Log the epochs of ``history`` (a resumed checkpoint's) that the run lacks: a run stopped
        between saving a checkpoint and logging its epoch would otherwise miss that epoch."""
        if not (self.active and history):
            return
        import mlflow

        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(self.run_id, "loss")}
        for row in history:
            if int(row["epoch"]) not in logged:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id:
            import mlflow

            mlflow.end_run(status=status)


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
    found.log_artifact(run_id, str(paths["metrics"]), "evaluation")
    found.log_artifact(run_id, str(paths["pr_curve"]), "evaluation")
    found.log_artifacts(run_id, str(paths["pictures"]), "evaluation/pictures")
