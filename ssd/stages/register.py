"""``ssd register``: log the model to MLflow, register it, move ``challenger`` (and maybe ``champion``).

The pyfunc is logged into the training's run (``models/mlflow_run.json``) and registered as a new
version of ``registry.model_name``, tagged with its validation metrics, the validation split they
came from and its training run's provenance (git commit, data hash and source); it gets the alias
``challenger``. ``champion`` moves to it only when ``ssd.mlops.registry.decide_promotion`` says so
(no champion yet, or val mAP@0.5 better by at least ``registry.min_improvement``, the champion
re-scored first if its figure came from another validation split). The version's description
states its metrics and that decision; ``reports/registration.json`` records the outcome (keys:
``ssd.mlops.records``).

Every version also gets its ONNX file (``ssd.mlops.onnx_artifact``): the version's weights as
``ssd export`` writes them, checked against PyTorch on validation images, logged into the version's
run as ``onnx/<name>/<version>/model.onnx`` and named by the version's tag ``onnx``
(``ssd.mlops.records``), so a consumer without torch can fetch the ONNX of ``models:/tinyssd@champion``.

Order, so that a failure moves nothing: everything the decision needs is read first (the run, the
champion, an existing version); then the version is registered (or reused) and must load from the
registry and predict one validation image (``ssd.mlops.registry.check_version``), then its ONNX file
must match PyTorch and be logged (once per version: a reused version that has it keeps it); only
then do ``challenger`` and ``champion`` move. Running it twice is safe: a version with the same
weights (``ssd.mlops.registry.weights_digest``) is reused rather than duplicated.

Two at once take turns: from reading the champion to moving the aliases the stage holds the
registry lock (``ssd.mlops.lease``), so a second ``ssd register`` of the same weights finds the
version the first registered. Right before an alias moves, the lease is checked and the champion
read again; if it moved meanwhile (a person in the UI), the decision is made again against it. The
record is written from the registry's state after the move. The registry's operations and its
errors: ``ssd.mlops.registry``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssd.data.layout import EVAL_FILE, MODEL_FILE, RAW_DIR, REGISTRATION_FILE, RUN_FILE
from ssd.mlops.provenance import run_provenance, split_digest
from ssd.mlops.lease import Lease, registry_lock
from ssd.mlops.onnx_artifact import log_onnx
from ssd.mlops.records import CHALLENGER, CHAMPION, GATE, METRIC, ONNX_TAG, RECORD, version_uri
from ssd.mlops.registry import (CHAMPION_REASON, LOAD_CHECK, LOAD_PASSED, MODEL_SHA, RUN_ID, VAL_DIGEST, WEIGHTS,
                                Decision, champion_gate, champion_of, check_version, decide_promotion, find_version,
                                log_pyfunc, model_config, validation_split, version_description, weights_digest)
from ssd.mlops.tracking import client as mlflow_client
from ssd.mlops.tracking import read_run_file
from ssd.stages import common
from ssd.util.errors import TransientError
from ssd.util.files import atomic_write_json, file_digest
from ssd.util.settings import DataSettings, EvaluateSettings, RegistrySettings, Settings

PARAMS = ("registry", "evaluate.threshold", "evaluate.nms_threshold", "evaluate.nms", "data.image_size",
          "data.max_image_pixels", "data.classes", "data.max_boxes_per_image", "data.max_label_line_bytes", "data.max_label_rows")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_path_options(parser, model=(MODEL_FILE, "model file"), eval=(EVAL_FILE, "evaluation metrics"),
                            run_file=(RUN_FILE, "the training's MLflow run"), out=(REGISTRATION_FILE, "record"),
                            data=(RAW_DIR, "the data, for its validation split"))
    common.add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    record = register(_settings(args), args.model, args.eval, args.run_file, args.out, args.data)
    print(json.dumps(record, indent=2))
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    """The params; for a model whose recipe carries its detection settings (``ssd.core.recipe``), with
    those and the display threshold its evaluation chose (``threshold_from`` in eval.json) taken as
    ``ssd evaluate`` takes them (``ssd.stages.model_params``)."""
    from ssd.core.model import read_model
    from ssd.core.recipe import picks_threshold
    from ssd.mlops.models import file_settings
    from ssd.stages import model_params

    try:
        file = read_model(args.model)
    except (OSError, ValueError):  # register() names a missing file, and registers one that does not load
        file = None                 # with its load check failed
    if file is None or not picks_threshold(file.recipe):
        return common.settings(args, PARAMS)
    model = file_settings(file)
    metrics = json.loads(Path(args.eval).read_text()) if Path(args.eval).is_file() else {}
    if "threshold_from" in metrics:
        model["evaluate.threshold"] = metrics["threshold"]
    settings, _ = model_params.resolve(model_params.given_params(args, PARAMS), PARAMS, model, args.model)
    return settings


@dataclass(frozen=True)
class _Before:
    """What the stage reads before it takes the registry lock: an error while reading stops the stage
    with nothing registered and no alias moved."""
    name: str
    min_improvement: float
    metrics: dict[str, Any]
    run_id: str
    uri: str
    client: Any
    model_sha: str
    weights: str                    # ssd.mlops.registry.weights_digest: which version these weights are
    split_dir: Path
    val_digest: str
    metric_tags: dict[str, str]
    origin: dict[str, str]          # the training run's provenance (git commit, data hash and source)


@dataclass(frozen=True)
class _Found:
    """The registry's state as read under the lock, before anything changes."""
    champion: Any | None
    existing: Any | None            # the version already registered with these weights


def _read_metrics(model_path: Path, eval_file: Path) -> dict[str, Any]:
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path} (run the train stage first)")
    if not eval_file.is_file():
        raise FileNotFoundError(f"{eval_file} not found (run the evaluate stage first)")
    metrics = json.loads(eval_file.read_text())
    if METRIC not in metrics:
        raise ValueError(f"{eval_file}: no {METRIC!r} metric")
    return metrics


def _read_before(cfg: RegistrySettings, model_path: Path, eval_file: Path, run_file: str | Path,
                 data_dir: str | Path) -> _Before:
    name, min_improvement = str(cfg.model_name), float(cfg.min_improvement)
    metrics = _read_metrics(model_path, eval_file)
    run = read_run_file(run_file)
    run_id, uri = run["run_id"], run["tracking_uri"]
    client = mlflow_client(uri)  # an unreachable server fails here, in seconds (exit 75)

    metric_tags = {f"val_{k}": str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    # The split those metrics came from (the evaluate stage read the same data/raw): a later
    # candidate scored on another split re-scores this version before comparing with it.
    split_dir = validation_split(data_dir)
    val_digest = split_digest(split_dir)
    metric_tags[VAL_DIGEST] = val_digest
    origin = run_provenance(client.get_run(run_id).data.tags)  # the version's provenance is its run's
    return _Before(name, min_improvement, metrics, run_id, uri, client, file_digest(model_path),
                   weights_digest(model_path), split_dir, val_digest, metric_tags, origin)


def _find(before: _Before) -> _Found:
    # Champion first: a failing lookup stops the stage before anything is registered.
    return _Found(champion_of(before.client, before.name),
                  find_version(before.client, before.name, before.weights))


def _register_or_reuse(before: _Before, existing: Any | None, model_path: Path, config: dict[str, Any]) -> Any:
    """The model version for these weights: registered now, or the one found under the lock."""
    name, client = before.name, before.client
    if existing is None:
        import mlflow

        model_uri = log_pyfunc(before.run_id, model_path, config)
        tags = {**before.metric_tags, **before.origin, RUN_ID: before.run_id, MODEL_SHA: before.model_sha,
                WEIGHTS: before.weights}
        return mlflow.register_model(model_uri, name, tags=tags)
    # Same weights, maybe re-evaluated (other threshold, other validation split): the metric tags
    # follow the current eval.json; the provenance stays the run's it was registered from.
    for key, value in before.metric_tags.items():
        if (existing.tags or {}).get(key) != value:
            client.set_model_version_tag(name, str(existing.version), key, value)
    return existing


def _rescore_note(gate: dict[str, Any]) -> str:
    """Why the champion's figure is not its stored one, for the decision's reason."""
    stored, was_on = gate[GATE.champion_stored_map_50], gate[GATE.champion_stored_val_digest]
    return (f"; the champion was re-scored on this validation split ({gate[GATE.val_digest][:19]}…): its stored "
            f"{METRIC} {'unknown' if stored is None else f'{stored:.4f}'} was computed on "
            + (f"{was_on[:19]}…" if was_on else "an unrecorded split"))


def _decide(before: _Before, champion: Any | None, version_no: str, candidate: float, data: DataSettings,
            evaluate: EvaluateSettings) -> tuple[Decision, dict[str, Any] | None]:
    """The champion decision for ``version_no`` against ``champion`` and the figures it compared
    (None: no comparison)."""
    if champion is not None and str(champion.version) == version_no:
        return Decision(False, f"version {version_no} is already the {CHAMPION}"), None
    # Raises when the champion cannot be re-scored: no comparison, so no promotion.
    gate = champion_gate(before.name, champion, candidate, before.val_digest, before.split_dir, data,
                         evaluate) if champion else None
    decision = decide_promotion(candidate, gate[GATE.champion_map_50] if gate else None,
                                before.min_improvement, has_champion=champion is not None)
    if gate and gate[GATE.rescored]:
        decision = Decision(decision.promote, decision.reason + _rescore_note(gate))
    return decision, gate


def _version_of(version: Any | None) -> str | None:
    return None if version is None else str(version.version)


REDECIDE = 3  # decisions made again when the champion keeps moving under one (then exit 75)


def _decide_and_move(before: _Before, lease: Lease, champion: Any | None, version_no: str, candidate: float,
                     data: DataSettings, evaluate: EvaluateSettings) -> tuple[Decision, dict[str, Any] | None]:
    """Decide against ``champion``; move the aliases only if the lock is still ours and the champion
    read again now is the one decided against (else decide again against the new one)."""
    for _ in range(REDECIDE):
        decision, gate = _decide(before, champion, version_no, candidate, data, evaluate)
        lease.check()
        now = champion_of(before.client, before.name)
        if _version_of(now) == _version_of(champion):
            _move_aliases(before, version_no, decision)
            return decision, gate
        champion = now
    raise TransientError(f"the {CHAMPION} alias of {before.name!r} moved {REDECIDE} times while version {version_no} "
                         f"was being decided on: no alias moved; run it again")


def _move_aliases(before: _Before, version_no: str, decision: Decision) -> None:
    name, client = before.name, before.client
    client.set_registered_model_alias(name, CHALLENGER, version_no)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version_no)
        client.set_model_version_tag(name, version_no, CHAMPION_REASON, decision.reason)
    client.update_model_version(name, version_no, description=version_description(before.metrics, decision))


def _record(before: _Before, found: _Found, version_no: str, decision: Decision, gate: dict[str, Any] | None,
            candidate: float, onnx: str) -> dict[str, Any]:
    """What ``reports/registration.json`` says: the registry's aliases as they are after the move, and
    "promoted" only if the version is the champion then."""
    name = before.name
    champion = _version_of(champion_of(before.client, name))
    if decision.promote and champion != version_no:  # a writer without the lock moved it after the check
        decision = Decision(False, f"{decision.reason}; but version {champion} was made {CHAMPION} meanwhile")
    aliases = sorted(before.client.get_model_version(name, version_no).aliases or [])
    return {RECORD.model_name: name, RECORD.version: int(version_no),
            RECORD.model_uri: version_uri(name, version_no), RECORD.aliases: aliases,
            RECORD.decision: decision.label, RECORD.reason: decision.reason,
            RECORD.champion_version: int(champion) if champion is not None else None,
            RECORD.val_map_50: candidate, RECORD.run_id: before.run_id, RECORD.tracking_uri: before.uri,
            RECORD.reused_version: found.existing is not None, RECORD.weights_digest: before.weights,
            RECORD.provenance: before.origin, RECORD.val_digest: before.val_digest, RECORD.gate: gate,
            RECORD.onnx: onnx}


def register(settings: Settings, model_path: str | Path = MODEL_FILE, eval_file: str | Path = EVAL_FILE,
             run_file: str | Path = RUN_FILE, out: str | Path = REGISTRATION_FILE,
             data_dir: str | Path = RAW_DIR) -> dict[str, Any]:
    """The whole stage (see the module docstring) with the ``registry``, ``evaluate`` and ``data``
    settings of :data:`PARAMS`; returns what it writes to ``out``."""
    model_path = Path(model_path)
    before = _read_before(settings.registry, model_path, Path(eval_file), run_file, data_dir)
    config = model_config(settings.data, settings.evaluate)
    with registry_lock(before.client, before.name) as lease:
        found = _find(before)
        version = _register_or_reuse(before, found.existing, model_path, config)
        version_no = str(version.version)
        if (version.tags or {}).get(LOAD_CHECK) != LOAD_PASSED:  # checked once per version: the weights do not change
            check_version(before.client, before.name, version_no, before.split_dir)
        onnx = (version.tags or {}).get(ONNX_TAG) or log_onnx(before.client, before.name, version, before.split_dir)
        candidate = float(before.metrics[METRIC])
        decision, gate = _decide_and_move(before, lease, found.champion, version_no, candidate, settings.data,
                                          settings.evaluate)
        record = _record(before, found, version_no, decision, gate, candidate, onnx)
    atomic_write_json(out, record)
    return record
