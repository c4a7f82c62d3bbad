"""Scheduled retraining: the DVC pipeline's stages as Prefect tasks.

    python -m flows.retrain serve                 # the weekly deployment, served from this machine
    python -m flows.retrain run -S train.epochs=5 # one run now, without a server-side deployment

Each task runs ``dvc repro --single-item <stage>`` in the project directory, so the flow executes
exactly the commands of ``dvc.yaml``: an unchanged stage is skipped, ``dvc.lock`` stays true, and no
stage logic lives here. The fetch task runs ``dvc repro fetch``: fetch together with the always-run
``source`` stage before it, which rewrites the source's fingerprint only when the data changed
upstream, so fetch (and what depends on the data) reruns exactly then. The run summary says whether
the data was fetched again and why (``ssd.data.source.fetch_reason``). The stage's stdout and stderr are
streamed into the task's Prefect log line by line; a stage that fails raises ``StageFailed`` naming
the stage and the last lines of its stderr (``TransientStageFailure`` when its command exited 75).

Parameters work like ``dvc exp run -S key=value``: the overrides are written into ``params.yaml``
(atomically, comments kept) before the stages run, so the workspace, ``dvc.lock`` and the model
agree afterwards. ``nproc`` and ``source`` are shorthands for ``train.nproc`` (the number of torchrun
processes in the train stage's command) and ``data.source``.

Retries follow the ``ssd`` exit codes (``ssd.util.errors``) alone: a task is retried, with exponential
backoff, when (and only when) its stage's command exited 75 (transient: a server unreachable, or
5xx/429 after the command's own bounded retries); exit 1 (refused input, failed check) fails at once.
DVC exits 255 whatever its command's status, so each stage reports that status in the file named by
``SSD_EXIT_STATUS_FILE``, which ``run_stage`` sets; nothing human-readable is parsed. The tasks
retried are those that talk to servers: fetch (the dataset's) and register (MLflow's).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from ssd.data.layout import RAW_DIR, SOURCE_FILE
from ssd.data.source import fetch_reason, fetched_fingerprint, read_fingerprint
from ssd.util.errors import EXIT_STATUS_ENV, EXIT_TEMPFAIL
from ssd.util.files import atomic_write_text
from ssd.util.params import apply_overrides, check_params, parse_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "validate", "train", "evaluate", "register")
# Stages reproduced together with their upstream stages: fetch's only one is `source`, the always-run
# fingerprint of the data source, which must run right before it and inside the same retried task.
WITH_UPSTREAM = {"fetch"}
FLOW_NAME = "tinyssd-retrain"
DEPLOYMENT_NAME = "weekly-retrain"
WEEKLY_CRON = "0 3 * * 1"          # Mondays 03:00
TIMEZONE = "UTC"
ARTIFACT_KEY = "tinyssd-retrain"
FETCH_RETRIES = 3
FETCH_BACKOFF_S = 30.0             # task-level retries wait 30 s, 60 s, 120 s (plus jitter)
TAIL_LINES = 15


class StageFailed(RuntimeError):
    """A pipeline stage exited non-zero; the message names the stage and ends with its stderr tail.
    ``exit_status``: the status its ``ssd`` command reported (None if it reported none)."""

    def __init__(self, stage: str, tail: str, exit_status: int | None = None):
        super().__init__(f"stage {stage!r} failed: {tail}")
        self.stage, self.tail, self.exit_status = stage, tail, exit_status


class TransientStageFailure(StageFailed):
    """A stage whose command exited 75 (``EX_TEMPFAIL``): it may succeed when retried."""


# ----------------------------------------------------------------------------------------------
# running one stage

def stage_env() -> dict[str, str]:
    """The environment for stage subprocesses: this interpreter's ``bin`` first on PATH (so ``dvc``,
    ``ssd`` and ``torchrun`` in ``dvc.yaml`` are the ones installed beside it), unbuffered output so
    lines arrive as they are printed, and no progress bars (they are one endless line in a log)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


def _pump(stream: io.TextIOBase, name: str, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((name, line.rstrip("\n")))
    lines.put((name, None))


def _read_status(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # the command never got to report (not an ssd command, killed)
        return None


def run_stage(stage: str, project_dir: str | Path, log: Callable[[str], None] = print) -> str:
    """Run ``dvc repro --single-item stage`` (``dvc repro stage`` for ``WITH_UPSTREAM``) in
    ``project_dir``, passing each output line to ``log``.

    Returns what happened to ``stage`` itself: ``"ran"``, ``"skipped"`` (unchanged) or ``"restored"``
    (from DVC's run cache). Raises ``TransientStageFailure`` when it fails and its command exited 75,
    else ``StageFailed``, with the last lines of stderr.
    """
    import tempfile

    single = () if stage in WITH_UPSTREAM else ("--single-item",)
    command = [sys.executable, "-m", "dvc", "repro", *single, stage]
    with tempfile.TemporaryDirectory(prefix="ssd-stage-") as tmp:
        status_file = Path(tmp) / "exit_status"
        env = {**stage_env(), EXIT_STATUS_ENV: str(status_file)}
        outcome, tails, returncode = _stream(command, project_dir, env, stage, log)
        status = _read_status(status_file)  # the last ssd command's: DVC stops at the failing one
    if returncode != 0:
        tail = "\n".join(tails["stderr"] or tails["stdout"]) or f"exit status {returncode}"
        raise (TransientStageFailure if status == EXIT_TEMPFAIL else StageFailed)(stage, tail, status)
    return outcome


def _stream(command: list[str], cwd: str | Path, env: dict[str, str], stage: str,
            log: Callable[[str], None]) -> tuple[str, dict[str, deque], int]:
    """Run ``command``, passing each output line to ``log``; ``(outcome, stdout/stderr tails, exit status)``."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    # Two reader threads feed one queue so neither pipe can fill up and block the stage; logging
    # stays in this (the task's) thread.
    lines: queue.Queue = queue.Queue()
    for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        threading.Thread(target=_pump, args=(stream, name, lines), daemon=True).start()
    tails = {"stdout": deque(maxlen=TAIL_LINES), "stderr": deque(maxlen=TAIL_LINES)}
    outcome, open_streams = "ran", 2
    while open_streams:
        name, line = lines.get()
        if line is None:
            open_streams -= 1
            continue
        log(line)
        if line.strip():
            tails[name].append(line)
        if f"'{stage}' didn't change, skipping" in line:
            outcome = "skipped"
        elif f"'{stage}' is cached - skipping run" in line:
            outcome = "restored"
    return outcome, tails, proc.wait()


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only a stage whose command exited 75."""
    return isinstance(state.result(raise_on_failure=False), TransientStageFailure)


def _stage(stage: str, project_dir: str) -> str:
    logger = get_run_logger()
    outcome = run_stage(stage, project_dir, logger.info)
    logger.info("stage %r %s", stage, outcome)
    return outcome


# The tasks: one per stage, named as in dvc.yaml. Pure compute is not retried.
@task(name="fetch", retries=FETCH_RETRIES, retry_delay_seconds=exponential_backoff(FETCH_BACKOFF_S),
      retry_jitter_factor=0.2, retry_condition_fn=_retry_transient)
def fetch(project_dir: str) -> str:
    """Check the source's fingerprint; download (or generate) the dataset when it changed."""
    return _stage("fetch", project_dir)


@task(name="validate")
def validate(project_dir: str) -> str:
    """Check every image and label row."""
    return _stage("validate", project_dir)


@task(name="train")
def train(project_dir: str) -> str:
    """Train under torchrun with ``train.nproc`` processes (the stage's command in dvc.yaml)."""
    return _stage("train", project_dir)


@task(name="evaluate")
def evaluate(project_dir: str) -> str:
    """mAP, precision/recall and pictures on the validation split."""
    return _stage("evaluate", project_dir)


@task(name="register", retries=2, retry_delay_seconds=exponential_backoff(FETCH_BACKOFF_S),
      retry_condition_fn=_retry_transient)
def register(project_dir: str) -> str:
    """Register the model in MLflow and move the champion/challenger aliases."""
    return _stage("register", project_dir)


# ----------------------------------------------------------------------------------------------
# params

def flow_overrides(overrides: list[str] | None, nproc: int | None, source: str | None) -> list[str]:
    """The flow's params overrides: ``overrides`` then the shorthands (which win)."""
    items = list(overrides or [])
    if nproc is not None:
        if int(nproc) < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        items.append(f"train.nproc={int(nproc)}")
    if source:
        items.append(f"data.source={json.dumps(source)}")  # quoted: a source is a string, whatever it looks like
    return items


def write_params(path: str | Path, overrides: list[str]) -> list[str]:
    """Apply ``key.sub=value`` overrides to the params file in place, keeping its comments.

    ``ssd.util.params.apply_overrides`` checks the keys and parses the values, and the result must pass
    the params schema (one implementation for the CLI and the flow: a bad value fails here, before
    any stage runs, and the file is left as it was); only the overridden keys are then set in a
    round-trip copy of the file, which is written atomically. Returns the overrides that changed
    something (the file is not touched when none did).
    """
    from ruamel.yaml import YAML

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    text = path.read_text()
    old = parse_yaml(text, str(path)) or {}
    new = check_params(apply_overrides(old, overrides, source=str(path)), str(path), overrides)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(text)
    changed = []
    for item in overrides:
        *parents, leaf = item.partition("=")[0].split(".")
        src, before, dst = new, old, doc
        for part in parents:
            src, before, dst = src[part], before[part], dst[part]
        if before[leaf] != src[leaf] and item not in changed:
            dst[leaf] = src[leaf]
            changed.append(item)
    if changed:
        buffer = io.StringIO()
        rt.dump(doc, buffer)
        atomic_write_text(path, buffer.getvalue())
    return changed


# ----------------------------------------------------------------------------------------------
# the run summary

def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_results(project_dir: str | Path) -> dict[str, Any]:
    """The reports the stages wrote: train and eval metrics, the registration record."""
    reports = Path(project_dir) / "reports"
    return {"train": _read_json(reports / "train.json"), "eval": _read_json(reports / "eval.json"),
            "registration": _read_json(reports / "registration.json")}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _gate_line(gate: dict[str, Any] | None) -> str | None:
    """The champion comparison of a registration record, both figures on the same validation split."""
    if not gate:
        return None
    digest = str(gate.get("val_digest", "?"))
    line = (f"**Champion gate** on validation split `{digest[:20]}…`: candidate map_50 "
            f"{_fmt(gate.get('candidate_map_50'))} vs champion version {gate.get('champion_version')} "
            f"{_fmt(gate.get('champion_map_50'))}")
    stored, stored_digest = gate.get("champion_stored_map_50"), gate.get("champion_stored_val_digest")
    if gate.get("rescored"):
        return line + (f", re-scored on this split (its stored map_50 {_fmt(stored)} was computed on "
                       + (f"`{str(stored_digest)[:20]}…`)" if stored_digest else "an unrecorded split)"))
    return line + " (its stored map_50, computed on this same split)"


def summary_markdown(results: dict[str, Any], outcomes: dict[str, str], params_changed: list[str],
                     data: dict[str, Any] | None = None) -> str:
    """The run's markdown artifact: whether the data was fetched again and why (``data``, from
    ``ssd.data.source.fetch_reason``), stages, metrics table, model version and champion decision."""
    reg = results.get("registration") or {}
    if outcomes.get("register") == "ran" and reg.get("decision") == "promoted":
        standing = "**became champion**"
    else:  # not promoted now, or registration skipped (unchanged): what the last registration recorded
        standing = "**is champion**" if "champion" in (reg.get("aliases") or []) else "**not champion**"
    lines = ["# TinySSD retraining", ""]
    if data:
        fetched = "fetched again" if data.get("fetched") else "not fetched again"
        lines += [f"**Data** {fetched}: {data.get('reason')}", ""]
    if reg:
        lines += [f"**Model** `{reg.get('model_name', '?')}` version **{reg.get('version', '?')}** "
                  f"(`{reg.get('model_uri', '')}`): {standing}"
                  + f" ({reg.get('decision', '?')}: {reg.get('reason', '')}); aliases: "
                  + (", ".join(reg.get("aliases") or []) or "none")
                  + f"; current champion: version {reg.get('champion_version')}", ""]
        gate = _gate_line(reg.get("gate")) if outcomes.get("register") == "ran" else None
        lines += [gate, ""] if gate else []
    lines += ["| stage | result |", "|---|---|"] + [f"| {s} | {o} |" for s, o in outcomes.items()] + [""]
    rows = [(split, key, value) for split in ("train", "eval")
            for key, value in sorted((results.get(split) or {}).items()) if isinstance(value, (int, float))]
    if rows:
        lines += ["| report | metric | value |", "|---|---|---|"]
        lines += [f"| {'reports/' + split + '.json'} | {key} | {_fmt(value)} |" for split, key, value in rows]
        lines += [""]
    lines.append("Params overridden for this run: " + (", ".join(f"`{c}`" for c in params_changed) or "none"))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# the flow

@flow(name=FLOW_NAME, log_prints=True)
def retrain(project_dir: str = str(REPO_ROOT), overrides: list[str] | None = None, nproc: int | None = None,
            source: str | None = None, fetch_backoff_s: float = FETCH_BACKOFF_S) -> dict[str, Any]:
    """fetch -> validate -> train -> evaluate -> register, as ``dvc repro`` would, with a run summary.

    ``overrides``: ``key.sub=value`` items applied to ``params.yaml`` first (like ``dvc exp run -S``);
    ``nproc``: torchrun processes for training (``train.nproc``); ``source``: the dataset
    (``data.source``: auto, d2l, synthetic, a URL or a zip path); ``fetch_backoff_s``: the first
    delay of the fetch task's retries (then doubling).
    """
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    if not (project / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{project}: no dvc.yaml (project_dir must be the repository root)")
    changed = write_params(project / "params.yaml", flow_overrides(overrides, nproc, source))
    logger.info("params.yaml: %s", ", ".join(changed) or "unchanged")

    fetched_from = fetched_fingerprint(project / RAW_DIR)  # before fetch may replace the data
    outcomes = {"fetch": fetch.with_options(
        retry_delay_seconds=exponential_backoff(fetch_backoff_s)(FETCH_RETRIES))(str(project))}
    data = fetch_reason(fetched_from, read_fingerprint(project / SOURCE_FILE), outcomes["fetch"])
    logger.info("data: %s", data["reason"])
    for stage_task in (validate, train, evaluate, register):
        outcomes[stage_task.name] = stage_task(str(project))

    results = collect_results(project)
    create_markdown_artifact(markdown=summary_markdown(results, outcomes, changed, data), key=ARTIFACT_KEY,
                             description="TinySSD retraining: data, metrics, model version, champion decision")
    return {"stages": outcomes, "params_changed": changed, "data": data, **results}


# ----------------------------------------------------------------------------------------------
# serving

def serve(name: str = DEPLOYMENT_NAME, cron: str = WEEKLY_CRON, parameters: dict[str, Any] | None = None) -> None:
    """Create (or update) the scheduled deployment and run its flow runs from this process."""
    from prefect.schedules import Cron

    retrain.serve(name=name, schedules=[Cron(cron, timezone=TIMEZONE)], parameters=parameters or {},
                  description="Weekly TinySSD retraining: the DVC pipeline as Prefect tasks",
                  tags=["tinyssd"], pause_on_shutdown=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the scheduled deployment from this process (Ctrl-C stops it)")
    s.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (default: %(default)s)")
    s.add_argument("--cron", default=WEEKLY_CRON, help=f"schedule, {TIMEZONE} (default: %(default)r)")
    r = sub.add_parser("run", help="run the flow once now")
    for p in (s, r):
        p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="params override, like `dvc exp run -S` (repeatable)")
        p.add_argument("--nproc", type=int, help="torchrun processes for training (train.nproc)")
        p.add_argument("--source", help="dataset source (data.source)")
        p.add_argument("--project-dir", help=f"project root (default: {REPO_ROOT})")
    args = parser.parse_args(argv)
    parameters = {"project_dir": args.project_dir, "overrides": args.set, "nproc": args.nproc, "source": args.source}
    parameters = {k: v for k, v in parameters.items() if v}  # unset: the flow's defaults
    if args.command == "serve":
        serve(args.name, args.cron, parameters)
    else:
        retrain(**parameters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
