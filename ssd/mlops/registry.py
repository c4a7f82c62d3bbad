"""The MLflow model registry's operations: versions, aliases, tags, the logged model, the champion rule.

The stage that uses them (``ssd register``: log, register, check, compare, move the aliases) is
``ssd.stages.register``; ``ssd promote --version N`` is :func:`promote`, what a person does in the UI.

A version is the pyfunc ``ssd.mlops.pyfunc.TinySSDModel`` (``model.pt`` inside as an artifact, with
a signature and an input example, :func:`log_pyfunc`), tagged with its validation metrics, the
validation split they were computed on (:data:`VAL_DIGEST`), its training run's provenance, its run
and its weights' digest (:func:`weights_digest`; :func:`find_version` reuses a version with the same
weights), and whether it loads (:func:`check_version`). Writers of one registered model take turns
through a lock the server holds (``ssd.mlops.lease``): :func:`promote` here, ``ssd register``.
``champion`` moves to a candidate only when :func:`decide_promotion` says so, on figures from one
validation split (:func:`champion_gate` re-scores the champion when its split was another).

Only MLflow's "does not exist" means "no champion" or "no such version"; any other error raises:
``ssd.util.errors.TransientError`` (exit 75) for an unreachable or failing server, exit 1 for the
rest. MLflow: the ``MlflowClient`` from ``ssd.mlops.tracking.client``; ``log_model``/
``register_model``/``load_model`` are MLflow's module functions because the client has no equivalent.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssd.mlops.lease import registry_lock
from ssd.mlops.records import CHAMPION, GATE, KEPT, METRIC, PROMOTED, figures, version_uri
from ssd.mlops.tracking import client as mlflow_client
from ssd.mlops.tracking import is_missing, tracking_uri
from ssd.util.errors import TransientError, is_transient
from ssd.util.files import file_digest
from ssd.util.settings import DataSettings, EvaluateSettings

MODEL_ARTIFACT = "model"    # the logged model's name inside the run
# Version tags
VAL_DIGEST = "val_digest"   # the validation split its val_* metrics were computed on
LOAD_CHECK = "load_check"   # LOAD_PASSED, or "failed: <why>" (never champion then)
LOAD_PASSED = "passed"
RUN_ID = "run_id"           # the run a version was registered from
MODEL_SHA = "model_sha256"  # the model file's bytes as registered (they differ between saves of equal weights)
WEIGHTS = "weights_digest"  # :func:`weights_digest`: what makes two versions the same model
CHAMPION_REASON = "champion_reason"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str

    @property
    def label(self) -> str:
        return PROMOTED if self.promote else KEPT


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
    cand, champ, by = figures(candidate, champion, gain)  # figures that differ never print equal
    if gain > 0 and gain >= min_improvement:
        return Decision(True, f"{METRIC} {cand} beats champion's {champ} by {by} (>= {min_improvement:g})")
    return Decision(False, f"{METRIC} {cand} does not beat champion's {champ} "
                           f"by more than 0 and at least {min_improvement:g}")


def model_config(data: DataSettings, evaluate: EvaluateSettings) -> dict[str, Any]:
    """The logged pyfunc's model config, read back by ``ssd.mlops.pyfunc.TinySSDModel.load_context``."""
    return {"image_size": int(data.image_size), "threshold": float(evaluate.threshold),
            "nms_threshold": float(evaluate.nms_threshold), "nms": evaluate.nms,
            "max_image_pixels": int(data.max_image_pixels),
            "device": "auto"}  # logged so a load-time config may override it


def log_pyfunc(run_id: str, model_path: str | Path, config: dict[str, Any]) -> str:
    """Log the pyfunc with ``model_path`` inside into run ``run_id``, with :func:`model_config`'s
    ``config``; returns the model URI."""
    import mlflow
    import pandas as pd
    import PIL
    import torch
    import torchvision

    from ssd.mlops import pyfunc as ssd_pyfunc

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=ssd_pyfunc.__file__,
            artifacts={ssd_pyfunc.WEIGHTS_ARTIFACT: str(model_path)},
            signature=ssd_pyfunc.signature(config["threshold"]), input_example=ssd_pyfunc.example_input(),
            model_config=config,
            # Explicit, so MLflow does not load the model in a subprocess to guess them. The `ssd`
            # package itself must be installed where the model is loaded (it is not on PyPI).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}",
                              f"pillow=={PIL.__version__}", f"pandas=={pd.__version__}",
                              f"mlflow=={mlflow.__version__}"])
    return info.model_uri


def weights_digest(model_path: str | Path) -> str:
    """``sha256:<hex>`` of a model file's config and state dict (every tensor's name, dtype, shape and
    bytes, in key order): equal for equal weights, however often the file is saved (``torch.save``
    writes a new serialization id every time, and the file carries its training history). A file
    that is not a TinySSD model file gets ``file-sha256:<hex>`` of its bytes (registered as it is,
    it then fails the load check)."""
    import torch

    try:
        blob = torch.load(model_path, map_location="cpu", weights_only=True)
        config, state = blob["config"], blob["model"]
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    except Exception:  # any unreadable or foreign file: its bytes are all there is to name it by
        return f"file-sha256:{file_digest(model_path)}"
    return f"sha256:{digest.hexdigest()}"


def find_version(client: Any, name: str, weights: str) -> Any | None:
    """The version of ``name`` already registered with these weights (tag :data:`WEIGHTS`), if any;
    the oldest when there are several. A search that fails raises (never read as "none": that
    would register a duplicate)."""
    found = [version for version in client.search_model_versions(f"name='{name}'")
             if (version.tags or {}).get(WEIGHTS) == weights]
    return min(found, key=lambda version: int(version.version)) if found else None


def champion_of(client: Any, name: str) -> Any | None:
    """The version ``champion`` points at; None only when MLflow says it does not exist (no such
    model or alias). Any other error raises: read as "no champion" it would crown any candidate."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception as exc:
        if is_missing(exc):  # no such model
            return None
        # A model without the alias answers "invalid parameter"; its alias map confirms the absence.
        if not (isinstance(exc, MlflowException) and exc.error_code == "INVALID_PARAMETER_VALUE"):
            raise
        if CHAMPION in (client.get_registered_model(name).aliases or {}):
            raise
        return None


def validation_split(data_dir: str | Path) -> Path:
    """The validation split folder under ``data_dir`` (``data/raw``, or a dataset root itself)."""
    from ssd.data.labels import find_split
    from ssd.data.layout import dataset_root

    return find_split(dataset_root(data_dir), "val")


def rescore_version(name: str, version: int | str, split_dir: str | Path, data: DataSettings,
                    evaluate: EvaluateSettings) -> dict[str, Any]:
    """The evaluate stage's metrics for registered ``version`` of ``name`` on the split ``split_dir``.

    The weights are the version's own, opened as ``ssd predict`` opens them (``ssd.mlops.models``:
    weights and settings, no stored code). ``RuntimeError`` naming the version when they cannot be
    loaded, ``TransientError`` when the registry could not be reached to download them.
    """
    from ssd.engine.evaluation import load_validation, score
    from ssd.mlops.models import open_model

    uri = version_uri(name, version)
    try:
        net = open_model(uri, "cpu").net
    except Exception as exc:
        if is_transient(exc):
            raise TransientError(f"cannot download {uri} to re-score it: {exc}") from None
        raise RuntimeError(f"cannot re-score {uri} on the current validation split: its model could not be "
                           f"loaded ({type(exc).__name__}: {exc})") from None
    return score(net, load_validation(data, split_dir), evaluate).metrics


def champion_gate(name: str, champion: Any, candidate: float, val_digest: str, split_dir: str | Path,
                  data: DataSettings, evaluate: EvaluateSettings) -> dict[str, Any]:
    """The figures a candidate scored on the split ``val_digest`` is compared on.

    The champion's stored ``val_map_50`` counts only if it was computed on the same split (tag
    ``val_digest``; a version without it counts as another split); otherwise the champion is
    re-scored on ``split_dir`` now, and that figure is the one compared (``champion_map_50``).
    """
    tags = champion.tags or {}
    stored = tags.get(f"val_{METRIC}")
    gate: dict[str, Any] = {
        GATE.val_digest: val_digest, GATE.candidate_map_50: candidate, GATE.champion_version: int(champion.version),
        GATE.champion_stored_map_50: float(stored) if stored is not None else None,
        GATE.champion_stored_val_digest: tags.get(VAL_DIGEST), GATE.rescored: tags.get(VAL_DIGEST) != val_digest}
    rescored = (rescore_version(name, champion.version, split_dir, data, evaluate)[METRIC]
                if gate[GATE.rescored] else None)
    gate[GATE.champion_rescored_map_50] = rescored
    gate[GATE.champion_map_50] = rescored if gate[GATE.rescored] else gate[GATE.champion_stored_map_50]
    return gate


def check_version(client: Any, name: str, version: str, split_dir: str | Path) -> None:
    """Load registered ``version`` of ``name`` as ``ssd predict`` does (its weights and settings,
    ``ssd.mlops.models``: no stored code runs) and detect on the first image of ``split_dir``; tag
    the version ``load_check`` with the outcome. ``RuntimeError`` (exit 1) when it fails to load or
    predict; ``TransientError`` when the registry could not be reached to try."""
    from ssd.data.images import read_image
    from ssd.engine.inference import detect
    from ssd.mlops.models import open_model

    image = min((Path(split_dir) / "images").iterdir())
    uri = version_uri(name, version)
    try:
        stored = open_model(uri, "cpu")
        tensor, size = read_image(image, stored.settings["data.image_size"])
        detect(stored.net, tensor[None], [size], threshold=0.0,
               nms_threshold=stored.settings["evaluate.nms_threshold"])
    except Exception as exc:  # a model can fail to load or run in any way: none of them may be crowned
        if is_transient(exc):
            raise TransientError(f"cannot load {uri} to check it: {exc}") from None
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        client.set_model_version_tag(name, version, LOAD_CHECK, f"failed: {reason}")
        raise RuntimeError(f"{uri} was registered but does not load and predict {image.name} ({reason}): "
                           f"no alias moved") from None
    client.set_model_version_tag(name, version, LOAD_CHECK, LOAD_PASSED)


def version_description(metrics: dict[str, Any], decision: Decision) -> str:
    """A version's description in the registry (markdown): its validation metrics and the champion decision."""
    shown = ", ".join(f"{key} {float(metrics[key]):.4f}" for key in ("map_50", "map", "precision", "recall")
                      if isinstance(metrics.get(key), (int, float)))
    at = f" (precision and recall at score >= {metrics['threshold']:g})" if "threshold" in metrics else ""
    return (f"**Validation** (reports/eval.json): {shown or 'no metrics'}{at}\n\n"
            f"**Champion decision**: {decision.label}: {decision.reason}")


def promote(name: str, version: int | str, uri: str | None = None) -> dict[str, Any]:
    """Point ``champion`` at ``version`` of ``name``, holding the registry lock (an ``ssd register``
    deciding at the same time decides before or after it, never across it); ``ValueError`` naming the
    versions if it does not exist (MLflow's "does not exist"; any other error raises as it is)."""
    uri = uri or tracking_uri()
    client = mlflow_client(uri)
    with registry_lock(client, name):
        return _promote(client, name, version, uri)


def _promote(client: Any, name: str, version: int | str, uri: str) -> dict[str, Any]:
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
    client.set_model_version_tag(name, str(version), CHAMPION_REASON, "promoted manually (ssd promote)")
    return {"model_name": name, "version": int(version), "alias": CHAMPION,
            "previous_champion": int(previous.version) if previous is not None else None}
