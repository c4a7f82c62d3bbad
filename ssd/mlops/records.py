"""The registry's names that other code reads: the aliases, the keys of ``reports/registration.json``
and where a version's ONNX file is.

``ssd.stages.register`` writes the record with these keys and the flow (``flows/retrain.py``) reads
it with them. No MLflow or torch here: the flow imports this cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass

CHAMPION, CHALLENGER = "champion", "challenger"   # the registered model's aliases (alias_uri)
METRIC = "map_50"                                 # the validation metric that decides promotion
PROMOTED, KEPT = "promoted", "kept"               # the record's decision
# Where a registered version's ONNX file is (``ssd register`` logs it; consumer/ssd_onnx reads it):
# this path, one per version, inside the artifacts of the version's run (one run may register two
# versions: raising train.epochs continues a finished run), named by the version tag ONNX_TAG.
ONNX_ARTIFACT = "onnx/{name}/{version}/model.onnx"   # MLflow refuses '/' and ':' in model names
ONNX_TAG = "onnx"                                 # its value: onnx_uri(<the version's run id>, name, version)


@dataclass(frozen=True)
class RecordKeys:
    """The keys of ``reports/registration.json``, in the order it is written."""
    model_name: str = "model_name"
    version: str = "version"
    model_uri: str = "model_uri"
    aliases: str = "aliases"                      # the version's aliases after the stage
    decision: str = "decision"                    # PROMOTED or KEPT
    reason: str = "reason"
    champion_version: str = "champion_version"    # the champion after the stage (None: none)
    val_map_50: str = f"val_{METRIC}"             # the candidate's
    run_id: str = "run_id"
    tracking_uri: str = "tracking_uri"
    reused_version: str = "reused_version"        # True: a version with these weights existed already
    weights_digest: str = "weights_digest"        # ssd.mlops.registry.weights_digest of the model file
    provenance: str = "provenance"
    val_digest: str = "val_digest"                # the validation split the candidate was scored on
    gate: str = "gate"                            # GateKeys' figures, or None when no champion was compared
    onnx: str = "onnx"                            # onnx_uri: the version's ONNX file (its tag ONNX_TAG)


@dataclass(frozen=True)
class GateKeys:
    """The keys of the record's ``gate``: the figures the candidate was compared on, in the order written."""
    val_digest: str = "val_digest"
    candidate_map_50: str = f"candidate_{METRIC}"
    champion_version: str = "champion_version"
    champion_stored_map_50: str = f"champion_stored_{METRIC}"         # from the champion's version tags
    champion_stored_val_digest: str = "champion_stored_val_digest"   # the split that figure was computed on
    rescored: str = "rescored"                                       # True: another split, so re-scored now
    champion_rescored_map_50: str = f"champion_rescored_{METRIC}"    # None when not re-scored
    champion_map_50: str = f"champion_{METRIC}"                      # the figure compared


RECORD, GATE = RecordKeys(), GateKeys()


def version_uri(name: str, version: int | str) -> str:
    """``models:/<name>/<version>``: one registered version."""
    return f"models:/{name}/{version}"


def alias_uri(name: str, alias: str = CHAMPION) -> str:
    """``models:/<name>@<alias>``: whichever version the alias points at when it is loaded."""
    return f"models:/{name}@{alias}"


def onnx_artifact(name: str, version: int | str) -> str:
    """``onnx/<name>/<version>/model.onnx``: version ``version`` of ``name``'s ONNX file in its run's artifacts."""
    return ONNX_ARTIFACT.format(name=name, version=version)


def onnx_uri(run_id: str, name: str, version: int | str) -> str:
    """``runs:/<run id>/onnx/<name>/<version>/model.onnx``: the ONNX file of that version, registered
    from run ``run_id`` (the value of its tag :data:`ONNX_TAG`)."""
    return f"runs:/{run_id}/{onnx_artifact(name, version)}"


def figures(*values: float, decimals: int = 4) -> tuple[str, ...]:
    """``values`` at ``decimals`` decimals, or with as many more as it takes for values that differ to
    print differently (0 and 4.6e-05: ``0.000000`` and ``0.000046``, never both ``0.0000``); Python's
    shortest round-trip form (``repr``) when even 17 decimals do not tell them apart."""
    distinct = len(set(values))
    for places in range(decimals, 18):
        shown = tuple(f"{value:.{places}f}" for value in values)
        if len(set(shown)) == distinct:
            return shown
    return tuple(repr(float(value)) for value in values)
