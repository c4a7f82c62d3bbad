"""Where a person opens a training's MLflow records: the UI addresses of its run, a registered model
version and the evaluation's gallery picture.

The routes are the MLflow UI's own: ``<server>/#/experiments/<id>/runs?workflowType=machine_learning``
(the experiment's training runs: MLflow 3.17's UI opens any experiment on its GenAI overview unless the
address names the workflow, whatever the experiment's ``mlflow.experimentKind`` tag says),
``<server>/#/experiments/<id>/runs/<run>`` (what MLflow prints after a run), ``<server>/#/models/<name>/versions/<v>``, and ``<run page>/artifactPath/<file>`` (the
run's artifacts with that file shown). With an HTTP(S) tracking server the addresses are the
server's. A local store (SQLite, a folder) has no server: the addresses are those of ``mlflow ui``
on its default address, and :attr:`MlflowLinks.serve_command` is the command that serves them.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import quote

from ssd.data.layout import GALLERY_PICTURE
from ssd.mlops.tracking import EVALUATION_PICTURES, bound_http_retries, ensure_reachable

LOCAL_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address
TRAINING_WORKFLOW = "workflowType=machine_learning"  # the UI's "Model training" view, not "GenAI"
GALLERY_ARTIFACT = f"{EVALUATION_PICTURES}/{GALLERY_PICTURE}"  # in the training's run


@dataclass(frozen=True)
class MlflowLinks:
    run_id: str
    experiment: str            # the experiment's training runs
    run: str                   # the run's page
    model_version: str | None  # the registered version's page (None: none given)
    gallery: str | None        # the gallery picture among the run's artifacts (None: the run has none)
    serve_command: str | None  # None: the tracking server serves these pages; else the command that does


def ui_links(tracking_uri: str, experiment_id: str, run_id: str, model_name: str | None = None,
             version: int | str | None = None, gallery: bool = True) -> MlflowLinks:
    """The UI addresses of run ``run_id`` (in experiment ``experiment_id``) and of ``model_name``'s
    ``version`` at ``tracking_uri``; ``gallery``: whether the run holds the evaluation's gallery."""
    served = tracking_uri.startswith(("http://", "https://"))
    base = tracking_uri.rstrip("/") if served else LOCAL_UI
    runs = f"{base}/#/experiments/{quote(str(experiment_id), safe='')}/runs"
    run = f"{runs}/{quote(run_id, safe='')}"
    model = (f"{base}/#/models/{quote(model_name, safe='')}/versions/{quote(str(version), safe='')}"
             if model_name and version is not None else None)
    return MlflowLinks(run_id=run_id, experiment=f"{runs}?{TRAINING_WORKFLOW}", run=run, model_version=model,
                       gallery=f"{run}/artifactPath/{GALLERY_ARTIFACT}" if gallery else None,
                       serve_command=None if served else f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}")


def run_links(tracking_uri: str, run_id: str, model_name: str | None = None,
              version: int | str | None = None) -> MlflowLinks:
    """:func:`ui_links` for a run of the store at ``tracking_uri``, which is asked for the run's
    experiment and whether it holds the gallery (MLflow errors propagate: the run must exist)."""
    import mlflow

    ensure_reachable(tracking_uri)
    bound_http_retries()
    # Not tracking.client(): that one also sets the process's fluent tracking URI, which the flow's
    # process (or a test calling the flow in-process) has no use for.
    found = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = found.get_run(run_id).info.experiment_id
    pictures = {item.path for item in found.list_artifacts(run_id, EVALUATION_PICTURES)}
    return ui_links(tracking_uri, experiment_id, run_id, model_name, version,
                    gallery=GALLERY_ARTIFACT in pictures)
