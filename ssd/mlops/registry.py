"""The MLflow model registry: register the trained model and decide which version serves.

    ssd register             # log the pyfunc into the training's run, register a version, move aliases
    ssd promote --version N  # what a person does in the UI: point `champion` at version N

``register`` logs ``ssd.mlops.pyfunc.TinySSDModel`` (``model.pt`` inside as an artifact, with a signature
and an input example) into the run named by ``models/mlflow_run.json``, registers it as a new
version of ``registry.model_name`` tagged with its validation metrics and its training run's
provenance (git commit, data hash and source: ``ssd.mlops.tracking.provenance``), and gives it the alias
``challenger``. ``champion`` moves to it only when :func:`decide_promotion` says so (no champion
yet, or val mAP@0.5 better by at least ``registry.min_improvement``). The version's description
states its metrics and that decision; ``reports/registration.json`` records the outcome.

Order, so that a failure moves nothing: everything the decision needs is read first (the run, the
champion, an existing version); then the version is registered (or reused) and must load from the
registry and predict one validation image (:func:`check_version`, tag ``load_check``); only then
do ``challenger`` and ``champion`` move. Only MLflow's "does not exist" means "no champion" or "no
such version"; any other error stops the stage: ``ssd.util.errors.TransientError`` (exit 75) for an
unreachable or failing server (checked first, and MLflow's HTTP retries bounded:
``ssd.mlops.tracking.client``), exit 1 for the rest.

Running it twice is safe: a version already registered from the same run with the same weights
(tags ``run_id`` and ``model_sha256``) is reused rather than duplicated.

MLflow: the registry's operations (versions, aliases, tags, the logged model) live here, on the
``MlflowClient`` from ``ssd.mlops.tracking.client``; ``log_model``/``register_model``/``load_model`` are
MLflow's module functions because the client has no equivalent.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssd.util.errors import TransientError
from ssd.util.files import atomic_write_json, file_digest
from ssd.mlops.tracking import client as mlflow_client
from ssd.util.errors import is_transient
from ssd.mlops.tracking import is_missing, read_run_file, run_provenance, split_digest

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC = "map_50"           # the metric that decides promotion
MODEL_ARTIFACT = "model"    # the logged model's name inside the run
VAL_DIGEST = "val_digest"   # version tag: the validation split its val_* metrics were computed on
LOAD_CHECK = "load_check"   # version tag: "passed", or "failed: <why>" (never champion then)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "kept"


def decide_promotion(candidate: float, champion: float | None, min_improvement: float = 0.0,
                     has_champion: bool | None = None) -> Decision:
    """Whether a candidate with val mAP@0.5 ``candidate`` should replace the champion.

    ``champion`` is the champion's val mAP@0.5 (``None`` if there is no champion, or, with
    ``has_champion=True``, if the champion's metric is unknown). The candidate must be strictly
    better, and better by at least ``min_improvement``.
    """
    has_champion = champion is not None if has_champion is None else has_champion
    if not math.isfinite(candidate):
        return Decision(False, f"candidate {METRIC} is {candidate}: not promoted")
    if not has_champion:
        return Decision(True, f"no champion yet: candidate {METRIC}={candidate:.4f} becomes champion")
    if champion is None or not math.isfinite(champion):
        return Decision(False, f"the champion's {METRIC} is unknown: not replaced automatically")
    gain = candidate - champion
    if gain > 0 and gain >= min_improvement:
        return Decision(True, f"{METRIC} {candidate:.4f} beats champion's {champion:.4f} by {gain:.4f} "
                              f"(>= {min_improvement:g})")
    return Decision(False, f"{METRIC} {candidate:.4f} does not beat champion's {champion:.4f} "
                           f"by more than 0 and at least {min_improvement:g}")


def log_pyfunc(run_id: str, model_path: str | Path, params: dict[str, Any]) -> str:
    """Log the pyfunc with ``model_path`` inside into run ``run_id``; returns the model URI."""
    import mlflow
    import pandas as pd
    import PIL
    import torch
    import torchvision

    from ssd.mlops import pyfunc as ssd_pyfunc

    threshold = float(params["evaluate"]["threshold"])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=ssd_pyfunc.__file__,
            artifacts={ssd_pyfunc.WEIGHTS_ARTIFACT: str(model_path)},
            signature=ssd_pyfunc.signature(threshold), input_example=ssd_pyfunc.example_input(),
            model_config={"image_size": int(params["data"]["image_size"]), "threshold": threshold,
                          "nms_threshold": float(params["evaluate"]["nms_threshold"]),
                          "max_image_pixels": int(params["data"]["max_image_pixels"]),
                          "device": "auto"},  # logged so a load-time config may override it
            # Explicit, so MLflow does not load the model in a subprocess to guess them. The `ssd`
            # package itself must be installed where the model is loaded (it is not on PyPI).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}",
                              f"pillow=={PIL.__version__}", f"pandas=={pd.__version__}",
                              f"mlflow=={mlflow.__version__}"])
    return info.model_uri


def find_version(client: Any, name: str, run_id: str, model_sha: str) -> Any | None:
    """The version of ``name`` already registered from ``run_id`` with these weights, if any. A
    search that fails raises (never read as "none": that would register a duplicate)."""
    for version in client.search_model_versions(f"name='{name}'"):
        tags = version.tags or {}
        if tags.get("run_id") == run_id and tags.get("model_sha256") == model_sha:
            return version
    return None


def champion_of(client: Any, name: str) -> Any | None:
    """The version ``champion`` points at; None only when MLflow says it does not exist (no such
    model or alias). Any other error raises: read as "no champion" it would crown any candidate."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception as exc:
        if is_missing(exc):
            return None
        raise


def validation_split(data_dir: str | Path) -> Path:
    """The validation split folder under ``data_dir`` (``data/raw``, or a dataset root itself)."""
    from ssd.data.labels import find_split
    from ssd.data.layout import dataset_root

    return find_split(dataset_root(data_dir), "val")


def rescore_version(name: str, version: int | str, params: dict[str, Any], split_dir: str | Path) -> dict[str, Any]:
    """The evaluate stage's metrics for registered ``version`` of ``name`` on the split ``split_dir``.

    The weights are the version's own: ``model.pt`` inside its logged model, downloaded from the
    registry. ``RuntimeError`` naming the version when they cannot be loaded, ``TransientError``
    when the registry could not be reached to download them.
    """
    import tempfile

    import mlflow
    from mlflow.models import Model

    from ssd.engine.evaluation import load_validation, score
    from ssd.core.model import load_model
    from ssd.mlops.pyfunc import WEIGHTS_ARTIFACT

    uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="ssd-rescore-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            weights = Model.load(str(local)).flavors["python_function"]["artifacts"][WEIGHTS_ARTIFACT]["path"]
            net = load_model(local / weights)
        except Exception as exc:
            if is_transient(exc):
                raise TransientError(f"cannot download {uri} to re-score it: {exc}") from None
            raise RuntimeError(f"cannot re-score {uri} on the current validation split: its model could not be "
                               f"loaded ({type(exc).__name__}: {exc})") from None
    return score(net, load_validation(params, split_dir), params).metrics


def champion_gate(name: str, champion: Any, candidate: float, val_digest: str, params: dict[str, Any],
                  split_dir: str | Path) -> dict[str, Any]:
    """The figures a candidate scored on the split ``val_digest`` is compared on.

    The champion's stored ``val_map_50`` counts only if it was computed on the same split (tag
    ``val_digest``; a version without it counts as another split); otherwise the champion is
    re-scored on ``split_dir`` now, and that figure is the one compared (``champion_map_50``).
    """
    tags = champion.tags or {}
    stored = tags.get(f"val_{METRIC}")
    gate: dict[str, Any] = {
        "val_digest": val_digest, f"candidate_{METRIC}": candidate, "champion_version": int(champion.version),
        f"champion_stored_{METRIC}": float(stored) if stored is not None else None,
        "champion_stored_val_digest": tags.get(VAL_DIGEST), "rescored": tags.get(VAL_DIGEST) != val_digest}
    rescored = rescore_version(name, champion.version, params, split_dir)[METRIC] if gate["rescored"] else None
    gate[f"champion_rescored_{METRIC}"] = rescored
    gate[f"champion_{METRIC}"] = rescored if gate["rescored"] else gate[f"champion_stored_{METRIC}"]
    return gate


def check_version(client: Any, name: str, version: str, split_dir: str | Path) -> None:
    """Load registered ``version`` of ``name`` from the registry as a consumer would
    (``models:/name/version``) and predict the first image of ``split_dir``; tag the version
    ``load_check`` with the outcome. ``RuntimeError`` (exit 1) when it fails to load or predict;
    ``TransientError`` when the registry could not be reached to try."""
    import mlflow
    import pandas as pd

    from ssd.mlops.pyfunc import IMAGE_COLUMN, OUTPUT_COLUMNS, encode_image

    image = min((Path(split_dir) / "images").iterdir())
    uri = f"models:/{name}/{version}"
    try:
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(pd.DataFrame({IMAGE_COLUMN: [encode_image(image.read_bytes())]}),
                            params={"threshold": 0.0})
        if list(out.columns) != OUTPUT_COLUMNS:
            raise ValueError(f"columns {list(out.columns)}, expected {OUTPUT_COLUMNS}")
    except Exception as exc:  # a model can fail to load or run in any way: none of them may be crowned
        if is_transient(exc):
            raise TransientError(f"cannot load {uri} to check it: {exc}") from None
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        client.set_model_version_tag(name, version, LOAD_CHECK, f"failed: {reason}")
        raise RuntimeError(f"{uri} was registered but does not load and predict {image.name} ({reason}): "
                           f"no alias moved") from None
    client.set_model_version_tag(name, version, LOAD_CHECK, "passed")


def version_description(metrics: dict[str, Any], decision: Decision) -> str:
    """A version's description in the registry (markdown): its validation metrics and the champion decision."""
    shown = ", ".join(f"{key} {float(metrics[key]):.4f}" for key in ("map_50", "map", "precision", "recall")
                      if isinstance(metrics.get(key), (int, float)))
    at = f" (precision and recall at score >= {metrics['threshold']:g})" if "threshold" in metrics else ""
    return (f"**Validation** (reports/eval.json): {shown or 'no metrics'}{at}\n\n"
            f"**Champion decision**: {decision.label}: {decision.reason}")


@dataclass(frozen=True)
class _Before:
    """What the stage decides on, all read before anything in the registry changes: an error while
    reading stops the stage with nothing registered and no alias moved."""
    name: str
    min_improvement: float
    metrics: dict[str, Any]
    run_id: str
    uri: str
    client: Any
    model_sha: str
    split_dir: Path
    val_digest: str
    metric_tags: dict[str, str]
    origin: dict[str, str]          # the training run's provenance (git commit, data hash and source)
    champion: Any | None
    existing: Any | None            # the version already registered from this run with these weights


def _read_metrics(model_path: Path, eval_file: Path) -> dict[str, Any]:
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path} (run the train stage first)")
    if not eval_file.is_file():
        raise FileNotFoundError(f"{eval_file} not found (run the evaluate stage first)")
    metrics = json.loads(eval_file.read_text())
    if METRIC not in metrics:
        raise ValueError(f"{eval_file}: no {METRIC!r} metric")
    return metrics


def _read_before(params: dict[str, Any], model_path: Path, eval_file: Path, run_file: str | Path,
                 data_dir: str | Path) -> _Before:
    cfg = params["registry"]
    name, min_improvement = str(cfg["model_name"]), float(cfg["min_improvement"])
    metrics = _read_metrics(model_path, eval_file)
    run = read_run_file(run_file)
    run_id, uri = run["run_id"], run["tracking_uri"]
    client = mlflow_client(uri)  # an unreachable server fails here, in seconds (exit 75)
    model_sha = file_digest(model_path)

    metric_tags = {f"val_{k}": str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    # The split those metrics came from (the evaluate stage read the same data/raw): a later
    # candidate scored on another split re-scores this version before comparing with it.
    split_dir = validation_split(data_dir)
    val_digest = split_digest(split_dir)
    metric_tags[VAL_DIGEST] = val_digest
    origin = run_provenance(client.get_run(run_id).data.tags)  # the version's provenance is its run's
    champion = champion_of(client, name)
    existing = find_version(client, name, run_id, model_sha)
    return _Before(name, min_improvement, metrics, run_id, uri, client, model_sha, split_dir, val_digest,
                   metric_tags, origin, champion, existing)


def _register_or_reuse(before: _Before, model_path: Path, params: dict[str, Any]) -> Any:
    """The model version for these weights: registered now, or the one found before."""
    name, client, version = before.name, before.client, before.existing
    if version is None:
        import mlflow

        model_uri = log_pyfunc(before.run_id, model_path, params)
        tags = {**before.metric_tags, **before.origin, "run_id": before.run_id, "model_sha256": before.model_sha}
        return mlflow.register_model(model_uri, name, tags=tags)
    # Same weights, maybe re-evaluated (other threshold): the tags follow the current eval.json.
    for key, value in {**before.metric_tags, **before.origin}.items():
        if (version.tags or {}).get(key) != value:
            client.set_model_version_tag(name, str(version.version), key, value)
    return version


def _rescore_note(gate: dict[str, Any]) -> str:
    """Why the champion's figure is not its stored one, for the decision's reason."""
    stored, was_on = gate[f"champion_stored_{METRIC}"], gate["champion_stored_val_digest"]
    return (f"; the champion was re-scored on this validation split ({gate['val_digest'][:19]}…): its stored "
            f"{METRIC} {'unknown' if stored is None else f'{stored:.4f}'} was computed on "
            + (f"{was_on[:19]}…" if was_on else "an unrecorded split"))


def _decide(before: _Before, version_no: str, candidate: float,
            params: dict[str, Any]) -> tuple[Decision, dict[str, Any] | None]:
    """The champion decision for ``version_no`` and the figures it compared (None: no comparison)."""
    champion = before.champion
    if champion is not None and str(champion.version) == version_no:
        return Decision(False, f"version {version_no} is already the champion"), None
    # Raises when the champion cannot be re-scored: no comparison, so no promotion.
    gate = champion_gate(before.name, champion, candidate, before.val_digest, params,
                         before.split_dir) if champion else None
    decision = decide_promotion(candidate, gate[f"champion_{METRIC}"] if gate else None,
                                before.min_improvement, has_champion=champion is not None)
    if gate and gate["rescored"]:
        decision = Decision(decision.promote, decision.reason + _rescore_note(gate))
    return decision, gate


def _move_aliases(before: _Before, version_no: str, decision: Decision) -> None:
    name, client = before.name, before.client
    client.set_registered_model_alias(name, CHALLENGER, version_no)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version_no)
        client.set_model_version_tag(name, version_no, "champion_reason", decision.reason)
    client.update_model_version(name, version_no, description=version_description(before.metrics, decision))


def _record(before: _Before, version_no: str, decision: Decision, gate: dict[str, Any] | None,
            candidate: float) -> dict[str, Any]:
    """What ``reports/registration.json`` says; the aliases as the registry has them now."""
    name, champion = before.name, before.champion
    champion_version = version_no if decision.promote else champion.version if champion is not None else None
    aliases = sorted(before.client.get_model_version(name, version_no).aliases or [])
    return {"model_name": name, "version": int(version_no), "model_uri": f"models:/{name}/{version_no}",
            "aliases": aliases, "decision": decision.label, "reason": decision.reason,
            "champion_version": int(champion_version) if champion_version is not None else None,
            f"val_{METRIC}": candidate, "run_id": before.run_id, "tracking_uri": before.uri,
            "reused_version": before.existing is not None, "provenance": before.origin,
            VAL_DIGEST: before.val_digest, "gate": gate}


def register(params: dict[str, Any], model_path: str | Path = "models/model.pt",
             eval_file: str | Path = "reports/eval.json", run_file: str | Path = "models/mlflow_run.json",
             out: str | Path = "reports/registration.json", data_dir: str | Path = "data/raw") -> dict[str, Any]:
    """The whole stage (see the module docstring); returns what it writes to ``out``."""
    model_path = Path(model_path)
    before = _read_before(params, model_path, Path(eval_file), run_file, data_dir)
    version = _register_or_reuse(before, model_path, params)
    version_no = str(version.version)
    if (version.tags or {}).get(LOAD_CHECK) != "passed":  # checked once per version: the weights do not change
        check_version(before.client, before.name, version_no, before.split_dir)
    candidate = float(before.metrics[METRIC])
    decision, gate = _decide(before, version_no, candidate, params)
    _move_aliases(before, version_no, decision)
    record = _record(before, version_no, decision, gate, candidate)
    atomic_write_json(out, record)
    return record


def promote(name: str, version: int | str, uri: str | None = None) -> dict[str, Any]:
    """Point ``champion`` at ``version`` of ``name``; ``ValueError`` naming the versions if it does not
    exist (MLflow's "does not exist"; any other error raises as it is)."""
    from ssd.mlops.tracking import tracking_uri

    uri = uri or tracking_uri()
    client = mlflow_client(uri)
    try:
        client.get_model_version(name, str(version))
    except Exception as exc:
        if not is_missing(exc):
            raise
        known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise ValueError(f"registered model {name!r} has no version {version} at {uri} "
                         f"(versions: {', '.join(map(str, known)) or 'none'})") from None
    previous = champion_of(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "champion_reason", "promoted manually (ssd promote)")
    return {"model_name": name, "version": int(version), "alias": CHAMPION,
            "previous_champion": int(previous.version) if previous is not None else None}
