"""The training's MLflow run: its name, params, tags, dataset inputs, metrics per epoch and checkpoints.

The train stage starts the run (or resumes the one its checkpoints name) on rank 0 through
:class:`Tracker`, which the training loop calls as its run log (``ssd.engine.loop.RunLog``); the
connection to the server (reachability, bounded retries) is ``ssd.mlops.tracking``'s.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ssd.mlops.provenance import PROVENANCE_KEYS, data_folder, data_source, dvc_md5, read_manifest
from ssd.mlops.tracking import client, is_missing, write_run_file

EXPERIMENT = "tinyssd"  # the MLflow experiment training runs go to (`ssd train --experiment`)



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
