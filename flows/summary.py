"""The flow run's summary: the reports the stages wrote, as one markdown artifact."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.stage_runner import RAN
from ssd.data.layout import EVAL_FILE, REGISTRATION_FILE, TRAIN_METRICS
from ssd.mlops.links import MlflowLinks
from ssd.mlops.records import CHAMPION, GATE, METRIC, PROMOTED, RECORD

TITLE = "# TinySSD retraining"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_results(project_dir: str | Path) -> dict[str, Any]:
    """The reports the stages wrote: train and eval metrics, the registration record."""
    project = Path(project_dir)
    return {"train": _read_json(project / TRAIN_METRICS), "eval": _read_json(project / EVAL_FILE),
            "registration": _read_json(project / REGISTRATION_FILE)}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _gate_line(gate: dict[str, Any] | None) -> str | None:
    """The champion comparison of a registration record, both figures on the same validation split."""
    if not gate:
        return None
    digest = str(gate.get(GATE.val_digest, "?"))
    line = (f"**Champion gate** on validation split `{digest[:20]}…`: candidate {METRIC} "
            f"{_fmt(gate.get(GATE.candidate_map_50))} vs champion version {gate.get(GATE.champion_version)} "
            f"{_fmt(gate.get(GATE.champion_map_50))}")
    stored, stored_digest = gate.get(GATE.champion_stored_map_50), gate.get(GATE.champion_stored_val_digest)
    if gate.get(GATE.rescored):
        return line + (f", re-scored on this split (its stored {METRIC} {_fmt(stored)} was computed on "
                       + (f"`{str(stored_digest)[:20]}…`)" if stored_digest else "an unrecorded split)"))
    return line + f" (its stored {METRIC}, computed on this same split)"


def _experiment_line(experiment: dict[str, Any]) -> str:
    name = experiment.get("experiment")
    where = "pushed to the git and DVC remotes" if experiment.get("ref_pushed") else "in this repository"
    return (f"**DVC experiment** `{name}` ({where}): `dvc exp show` lists it with its params and metrics; "
            f"`dvc exp apply {name}` and `dvc pull` restore its workspace")


def _model_line(reg: dict[str, Any], registered_now: bool) -> str:
    if registered_now and reg.get(RECORD.decision) == PROMOTED:
        standing = "**became champion**"
    else:  # not promoted now, or registration skipped (unchanged): what the last registration recorded
        standing = "**is champion**" if CHAMPION in (reg.get(RECORD.aliases) or []) else "**not champion**"
    return (f"**Model** `{reg.get(RECORD.model_name, '?')}` version **{reg.get(RECORD.version, '?')}** "
            f"(`{reg.get(RECORD.model_uri, '')}`): {standing}"
            f" ({reg.get(RECORD.decision, '?')}: {reg.get(RECORD.reason, '')}); aliases: "
            + (", ".join(reg.get(RECORD.aliases) or []) or "none")
            + f"; current champion: version {reg.get(RECORD.champion_version)}")


def _links_line(links: MlflowLinks) -> str:
    found = [f"[training runs]({links.experiment})", f"[run `{links.run_id}`]({links.run})"]
    found += [f"[model version]({links.model_version})"] if links.model_version else []
    found += [f"[gallery]({links.gallery})"] if links.gallery else []
    where = f" (served by `{links.serve_command}`)" if links.serve_command else ""
    return "**MLflow**" + where + ": " + " · ".join(found)


def _resumed_line(resumed: list[str]) -> str:
    return ("**Resumed** training from the checkpoints a stopped run kept (" + ", ".join(f"`{n}`" for n in resumed)
            + "), in that run's MLflow run")


def _outcomes_table(outcomes: dict[str, str]) -> list[str]:
    return ["| stage | result |", "|---|---|"] + [f"| {s} | {o} |" for s, o in outcomes.items()] + [""]


def _params_line(params_changed: list[str]) -> str:
    return "Params overridden for this run: " + (", ".join(f"`{c}`" for c in params_changed) or "none")


def stopped_markdown(how: str, stage: str | None, outcomes: dict[str, str], kept: Path | None,
                     params_changed: list[str]) -> str:
    """The artifact of a run that did not finish: ``how`` (``cancelled``, ``failed``), in which
    ``stage``, the stages done before it, and where its checkpoints are kept (``flows.resume``)."""
    lines = [TITLE, "", f"**Run {how}**" + (f" in stage `{stage}`" if stage else "") + ": no DVC experiment saved.",
             ""]
    if kept:
        names = ", ".join(f"`{p.name}`" for p in sorted(kept.iterdir())) if kept.is_dir() else ""
        lines += [f"**Checkpoints kept** at `{kept}` ({names}): the next run with the same params on this commit "
                  "resumes from them, in this run's MLflow run.", ""]
    else:
        lines += ["**No checkpoints kept**: training had written none (or keeping them failed: see the run's log).",
                  ""]
    return "\n".join(lines + _outcomes_table(outcomes) + [_params_line(params_changed)]) + "\n"


def summary_markdown(results: dict[str, Any], outcomes: dict[str, str], params_changed: list[str],
                     data: dict[str, Any] | None = None, experiment: dict[str, Any] | None = None,
                     resumed: list[str] | None = None, links: MlflowLinks | None = None) -> str:
    """The run's markdown artifact: the DVC experiment it saved (``experiment``, from
    ``flows.workspace.publish``), whether the data was fetched again and why (``data``, from
    ``ssd.data.source.fetch_reason``), the checkpoints it resumed from (``resumed``, from
    ``flows.resume``), stages, metrics table, model version and champion decision, and the MLflow
    pages of the run, version and gallery (``links``, from ``ssd.mlops.links``)."""
    reg = results.get("registration") or {}
    registered_now = outcomes.get("register") == RAN
    lines = [TITLE, ""]
    if experiment:
        lines += [_experiment_line(experiment), ""]
    if resumed:
        lines += [_resumed_line(resumed), ""]
    if data:
        fetched = "fetched again" if data.get("fetched") else "not fetched again"
        lines += [f"**Data** {fetched}: {data.get('reason')}", ""]
    if reg:
        lines += [_model_line(reg, registered_now), ""]
        gate = _gate_line(reg.get(RECORD.gate)) if registered_now else None
        lines += [gate, ""] if gate else []
    if links:
        lines += [_links_line(links), ""]
    lines += _outcomes_table(outcomes)
    rows = [(split, key, value) for split in ("train", "eval")
            for key, value in sorted((results.get(split) or {}).items()) if isinstance(value, (int, float))]
    if rows:
        lines += ["| report | metric | value |", "|---|---|---|"]
        files = {"train": TRAIN_METRICS, "eval": EVAL_FILE}
        lines += [f"| {files[split].as_posix()} | {key} | {_fmt(value)} |" for split, key, value in rows]
        lines += [""]
    lines.append(_params_line(params_changed))
    return "\n".join(lines) + "\n"
