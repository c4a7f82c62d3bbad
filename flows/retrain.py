"""Scheduled retraining: the DVC pipeline's stages as Prefect tasks.

    python -m flows.retrain serve                 # the weekly deployment, served from this machine
    python -m flows.retrain run -S train.epochs=5 # one run now, without a server-side deployment

Every flow run works in its own workspace (``flows.workspace``): a git worktree of the project at
its ``HEAD`` that shares the project's DVC cache. The deployment's checkout is never edited, so two
runs at once keep their own params. The run's params overrides are written into the workspace's
``params.yaml`` (``flows.params_file``: comments kept) like ``dvc exp run -S key=value``; ``nproc``
and ``source`` are shorthands for ``train.nproc`` and ``data.source``. At the end the workspace is
saved as a DVC experiment named after the flow run (params, ``dvc.lock``, metrics, plots), its data
and model are pushed to the DVC remote and its ref to the git remote ``origin`` when there is one.
A run whose params equal an earlier experiment's on the same commit continues from that one (its
``dvc.lock`` and outputs), so unchanged stages are skipped and training resumes from checkpoints.
A run that does not finish (a Prefect Cancel: SIGTERM to its processes; a failed stage; a crash)
keeps its training checkpoints for the next run with the same params on the same commit
(``flows.resume``), which resumes from them; its summary says so and where they are.

Each task runs ``dvc repro --single-item <stage>`` in the workspace (``flows.stage_runner``), so the
flow executes exactly the commands of ``dvc.yaml``: an unchanged stage is skipped and no stage logic
lives here. The fetch task runs the always-run ``source`` stage first, which rewrites the source's
fingerprint only when the data changed upstream, so fetch (and what depends on the data) reruns
exactly then; the summary (``flows.summary``) says whether the data was fetched again and why. The
stage's output is streamed into the task's Prefect log line by line; a stage that fails raises
``StageFailed`` naming the stage and the last lines of its stderr (``TransientStageFailure`` when
its command exited 75).

Retries follow the ``ssd`` exit codes (``ssd.util.errors``) alone: a task is retried, with exponential
backoff, when (and only when) its stage's command exited 75 (transient: a server unreachable, or
5xx/429 after the command's own bounded retries); exit 1 (refused input, failed check) fails at once.
DVC exits 255 whatever its command's status, so each stage reports that status in the file named by
``SSD_EXIT_STATUS_FILE``, which ``run_stage`` sets; nothing human-readable is parsed. The tasks
retried are those that talk to servers: fetch (the dataset's) and register (MLflow's).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import ExternalSignal
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows.params_file import flow_overrides, write_params
from flows.resume import claim_checkpoints, drop_kept, keep_checkpoints
from flows.stage_runner import TransientStageFailure, run_stage
from flows.summary import collect_results, stopped_markdown, summary_markdown
from flows.workspace import continue_from_experiment, experiment_name, publish, run_workspace
from ssd.data.source import fetch_reason, fetched_fingerprint, read_fingerprint
from ssd.data.layout import RAW_DIR, SOURCE_FILE
from ssd.mlops.links import MlflowLinks, run_links
from ssd.mlops.records import RECORD

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "validate", "train", "evaluate", "register")
FLOW_NAME = "tinyssd-retrain"
DEPLOYMENT_NAME = "weekly-retrain"
WEEKLY_CRON = "0 3 * * 1"          # Mondays 03:00
TIMEZONE = "UTC"
ARTIFACT_KEY = "tinyssd-retrain"
FETCH_RETRIES = 3
FETCH_BACKOFF_S = 30.0             # task-level retries wait 30 s, 60 s, 120 s (plus jitter)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only a stage whose command exited 75."""
    return isinstance(state.result(raise_on_failure=False), TransientStageFailure)


def _stage(stage: str, project_dir: str, env: dict[str, str] | None) -> str:
    logger = get_run_logger()
    outcome = run_stage(stage, project_dir, logger.info, env)
    logger.info("stage %r %s", stage, outcome)
    return outcome


# The tasks: one per stage, named as in dvc.yaml. Pure compute is not retried.
@task(name="fetch", retries=FETCH_RETRIES, retry_delay_seconds=exponential_backoff(FETCH_BACKOFF_S),
      retry_jitter_factor=0.2, retry_condition_fn=_retry_transient)
def fetch(project_dir: str, env: dict[str, str] | None = None) -> str:
    """Check the source's fingerprint; download (or generate) the dataset when it changed."""
    return _stage("fetch", project_dir, env)


@task(name="validate")
def validate(project_dir: str, env: dict[str, str] | None = None) -> str:
    """Check every image and label row."""
    return _stage("validate", project_dir, env)


@task(name="train")
def train(project_dir: str, env: dict[str, str] | None = None) -> str:
    """Train under torchrun with ``train.nproc`` processes (the stage's command in dvc.yaml)."""
    return _stage("train", project_dir, env)


@task(name="evaluate")
def evaluate(project_dir: str, env: dict[str, str] | None = None) -> str:
    """mAP, precision/recall and pictures on the validation split."""
    return _stage("evaluate", project_dir, env)


@task(name="register", retries=2, retry_delay_seconds=exponential_backoff(FETCH_BACKOFF_S),
      retry_condition_fn=_retry_transient)
def register(project_dir: str, env: dict[str, str] | None = None) -> str:
    """Register the model in MLflow and move the champion/challenger aliases."""
    return _stage("register", project_dir, env)


# ----------------------------------------------------------------------------------------------
# the flow

@flow(name=FLOW_NAME, log_prints=True)
def retrain(project_dir: str = str(REPO_ROOT), overrides: list[str] | None = None, nproc: int | None = None,
            source: str | None = None, fetch_backoff_s: float = FETCH_BACKOFF_S) -> dict[str, Any]:
    """fetch -> validate -> train -> evaluate -> register in the run's own workspace, saved as a DVC
    experiment named after the flow run, with a run summary (the MLflow run, version and gallery
    linked). Checkpoints that a stopped run kept for these params are resumed from; a run that
    stops keeps its own (``flows.resume``).

    ``overrides``: ``key.sub=value`` items applied to the workspace's ``params.yaml`` (like ``dvc exp
    run -S``); ``nproc``: torchrun processes for training (``train.nproc``); ``source``: the dataset
    (``data.source``: auto, d2l, synthetic, a URL or a zip path); ``fetch_backoff_s``: the first
    delay of the fetch task's retries (then doubling).
    """
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    if not (project / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{project}: no dvc.yaml (project_dir must be the repository root)")
    name = experiment_name(flow_run.get_name() or "run")
    outcomes: dict[str, str] = {}
    with run_workspace(project, name, logger.info) as workspace:
        changed = write_params(workspace / "params.yaml", flow_overrides(overrides, nproc, source))
        logger.info("params.yaml (this run's workspace): %s", ", ".join(changed) or "unchanged")
        continue_from_experiment(workspace, logger.info)
        resumed = claim_checkpoints(project, workspace, logger.info)
        try:
            data = _run_stages(workspace, stage_environment(project, name), fetch_backoff_s, outcomes)
            results = collect_results(workspace)
            experiment = publish(workspace, name, ("source", *outcomes), logger.info)
        except BaseException as exc:
            _stopped(project, workspace, exc, outcomes, changed)
            raise
        drop_kept(project, workspace)
    links = _mlflow_links(results.get("registration") or {})
    create_markdown_artifact(markdown=summary_markdown(results, outcomes, changed, data, experiment, resumed, links),
                             key=ARTIFACT_KEY,
                             description="TinySSD retraining: data, metrics, model version, champion decision")
    return {"stages": outcomes, "params_changed": changed, "data": data, "experiment": experiment,
            "resumed": resumed, **results}


def _run_stages(workspace: Path, env: dict[str, str], fetch_backoff_s: float, outcomes: dict[str, str]) -> dict:
    """Every stage in order in ``workspace``, each one's outcome into ``outcomes`` as it ends; returns
    why the data was (not) fetched again."""
    fetched_from = fetched_fingerprint(workspace / RAW_DIR)  # before fetch may replace the data
    outcomes["fetch"] = fetch.with_options(
        retry_delay_seconds=exponential_backoff(fetch_backoff_s)(FETCH_RETRIES))(str(workspace), env)
    data = fetch_reason(fetched_from, read_fingerprint(workspace / SOURCE_FILE), outcomes["fetch"])
    get_run_logger().info("data: %s", data["reason"])
    for stage_task in (validate, train, evaluate, register):
        outcomes[stage_task.name] = stage_task(str(workspace), env)
    return data


def _stopped(project: Path, workspace: Path, exc: BaseException, outcomes: dict[str, str], changed: list[str]) -> None:
    """A run that will not finish (cancelled, failed): keep its checkpoints for the next run with its
    params and say so in the run's artifact. Nothing here may hide ``exc``: errors are logged."""
    logger = get_run_logger()
    # A Prefect Cancel is a SIGTERM to the run's process (ExternalSignal here), Ctrl-C a KeyboardInterrupt;
    # the running stage has been stopped on the way here (flows.stage_runner).
    how = "cancelled" if isinstance(exc, (ExternalSignal, KeyboardInterrupt)) else "failed"
    kept = None
    try:
        kept = keep_checkpoints(project, workspace, logger.info)
    except Exception as error:  # a full disk, another run holding the kept folders for a minute
        logger.warning("checkpoints not kept: %s", error)
    try:
        stage = next((s for s in STAGES if s not in outcomes), None)
        create_markdown_artifact(markdown=stopped_markdown(how, stage, outcomes, kept, changed), key=ARTIFACT_KEY,
                                 description=f"TinySSD retraining {how}: where its checkpoints are kept")
    except Exception as error:
        logger.warning("no summary for the %s run: %s", how, error)


def _mlflow_links(registration: dict[str, Any]) -> MlflowLinks | None:
    """The MLflow pages of the registered version's run (None, with a warning, when the store does not answer)."""
    if not registration.get(RECORD.run_id):
        return None
    try:
        return run_links(registration[RECORD.tracking_uri], registration[RECORD.run_id],
                         registration.get(RECORD.model_name), registration.get(RECORD.version))
    except Exception as error:  # the summary still goes out, without links
        get_run_logger().warning("no MLflow links in the summary: %s", error)
        return None


def stage_environment(project: Path, name: str) -> dict[str, str]:
    """What the stages of run ``name`` see beyond the flow's environment: the experiment's name (the
    MLflow run is named after it) and, without MLFLOW_TRACKING_URI, the project's own SQLite store (the
    embedded default is relative to the working directory, here a temporary workspace)."""
    env = {"DVC_EXP_NAME": name}
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    return env


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
