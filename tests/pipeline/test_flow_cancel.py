"""The served deployment on a real `prefect server start`, its runs started through Prefect's API:
a Cancel during training stops every process of the run, ends its MLflow run KILLED and keeps its
checkpoints; then two runs at once, one with the cancelled run's params (it resumes) and one with
another seed: both complete with their own params and the deployment's checkout stays as it was.
The summaries link the MLflow run, model version and gallery, which the real MLflow server serves.

One served deployment (``python -m flows.retrain serve``, as test_flows.py serves it) for the module.
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
import time

import pytest

from flows import retrain as rt
from flows.resume import KEPT_DIR
from flows.workspace import RUNS_DIR, experiment_name
from mlflow_pages import resolve
from servers import process_group
from ssd.data.layout import CHECKPOINT_DIR
from ssd.util.files import exclusive_lock, lock_file
from test_flows import artifact, checkout_state, make_project, prefect_api  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

DEPLOYMENT = "cancel-test"
EPOCHS = 8  # training still runs when the Cancel lands, a second or two after epoch 1's checkpoint
DATA = ["data.source=synthetic", "data.synthetic.train=48", "data.synthetic.val=8", "data.image_size=160",
        "train.batch_size=8", "evaluate.gallery_images=2", "registry.model_name=tinyssd-cancel-test"]
RESUMED = DATA + ["base.seed=1", f"train.epochs={EPOCHS}"]   # the cancelled run's, then the resumed run's
OTHER = DATA + ["base.seed=2", "train.epochs=1"]             # the run beside it
STOP_S = 60


def client_call(method: str, *args, **kwargs):
    from prefect.client.orchestration import get_client

    async def call():
        async with get_client() as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(call())


def start_run(overrides: list[str]):
    """A flow run of the served deployment now, with ``overrides`` (``prefect deployment run``)."""
    deployment = client_call("read_deployment_by_name", f"{rt.FLOW_NAME}/{DEPLOYMENT}")
    return client_call("create_flow_run_from_deployment", deployment.id, parameters={"overrides": overrides})


def kind_of(args: list[str]) -> str | None:
    """Which of a run's commands ``args`` is: ``python -m dvc repro``, ``torchrun``, ``python [-u] -m ssd train``."""
    module = args[args.index("-m") + 1:args.index("-m") + 3] if "-m" in args else []
    if len(args) > 1 and os.path.basename(args[1]) == "torchrun":
        return "torchrun"
    return {"dvc": "dvc", "ssd": "ssd train" if module == ["ssd", "train"] else None}.get(module[0] if module else "")


def processes(root_pid: int) -> dict[int, tuple[float, str]]:
    """Every process under ``root_pid`` that is one of a run's commands: pid -> (start time, kind)."""
    import psutil

    found = {}
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            kind = kind_of(proc.cmdline())
            if kind:
                found[proc.pid] = (proc.create_time(), kind)
        except psutil.Error:  # ended meanwhile
            continue
    return found


def alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
    return result


def summary_links(markdown: str) -> list[str]:
    return re.findall(r"\]\((https?://[^)]+)\)", markdown)


@pytest.fixture(scope="module")
def served(prefect_api, mlflow_server, tmp_path_factory):  # noqa: F811
    """The deployment served from a fresh project, its runs tracked on the real MLflow server."""
    project = make_project(tmp_path_factory.mktemp("project"))
    before = checkout_state(project)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "MLFLOW_TRACKING_URI": mlflow_server, "DVC_NO_ANALYTICS": "1"}
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    command = [sys.executable, "-m", "flows.retrain", "serve", "--name", DEPLOYMENT, "--cron", "0 0 1 1 *",
               "--project-dir", str(project)]
    with process_group(command, log, env=env, cwd=project) as proc:
        wait(lambda: proc.poll() is not None or _deployed(), 60, "the deployment")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield {"project": project, "before": before, "proc": proc, "log": log}


def _deployed() -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        return bool(client_call("read_deployment_by_name", f"{rt.FLOW_NAME}/{DEPLOYMENT}"))
    except ObjectNotFound:
        return False


@pytest.fixture(scope="module")
def cancelled(served):
    """A run cancelled through Prefect's API once training has checkpointed epoch 1; what was seen."""
    project, proc = served["project"], served["proc"]
    run = start_run(RESUMED)
    workspace = project / RUNS_DIR / experiment_name(run.name)
    seen: dict[int, tuple[float, str]] = {}

    def first_epoch() -> bool:
        seen.update(processes(proc.pid))
        assert proc.poll() is None and not client_call("read_flow_run", run.id).state.is_final(), \
            served["log"].read_text()[-3000:]
        return (workspace / CHECKPOINT_DIR / "epoch_0001.pt").is_file()

    wait(first_epoch, 300, "epoch 1's checkpoint")
    seen.update(processes(proc.pid))
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    started = time.monotonic()
    client_call("set_flow_run_state", run.id, State(type=StateType.CANCELLING))
    wait(lambda: not any(alive(pid, t) for pid, (t, _) in seen.items()), STOP_S, "the run's processes to end")
    stopped_s = time.monotonic() - started
    final = wait(lambda: (r := client_call("read_flow_run", run.id)).state.is_final() and r, STOP_S - stopped_s,
                 "the run's final state")
    return {"run": final, "workspace": workspace, "seen": seen, "stopped_s": stopped_s,
            "final_s": time.monotonic() - started}


def test_cancel_during_training_stops_the_run_and_keeps_its_checkpoints(served, cancelled, mlflow_server):
    import mlflow
    import torch

    assert {kind for _, kind in cancelled["seen"].values()} == {"dvc", "torchrun", "ssd train"}, cancelled["seen"]
    assert cancelled["final_s"] < STOP_S, cancelled
    assert cancelled["run"].state.is_cancelled(), cancelled["run"].state
    workspace = cancelled["workspace"]
    with exclusive_lock(lock_file(workspace)):  # the run's lock is free (LockHeld otherwise)
        pass
    assert not workspace.exists()
    # The checkpoints are kept for the next run with these params, where the summary says.
    (kept,) = (served["project"] / KEPT_DIR).iterdir()
    checkpoints = sorted(kept.glob("epoch_*.pt"))
    assert checkpoints and checkpoints[-1].name < f"epoch_{EPOCHS:04d}.pt", checkpoints
    markdown = artifact(cancelled["run"].id).data
    assert "**Run cancelled** in stage `train`" in markdown and f"`{kept}`" in markdown, markdown
    run_id = torch.load(checkpoints[-1], weights_only=True)["mlflow_run_id"]
    assert mlflow.MlflowClient(mlflow_server).get_run(run_id).info.status == "KILLED"


def test_two_runs_at_once_one_resuming_the_cancelled_one(served, cancelled, mlflow_server):
    import mlflow
    import torch

    project = served["project"]
    (kept,) = (project / KEPT_DIR).iterdir()
    last = torch.load(max(kept.glob("epoch_*.pt")), weights_only=True)
    cancelled_run, cancelled_epoch = last["mlflow_run_id"], last["epoch"]
    started_ms = time.time() * 1000
    runs = {"resumed": start_run(RESUMED), "other": start_run(OTHER)}
    finals = {key: wait(lambda r=run: (f := client_call("read_flow_run", r.id)).state.is_final() and f, 540,
                        f"the {key} run") for key, run in runs.items()}
    assert all(run.state.is_completed() for run in finals.values()), \
        ({k: r.state for k, r in finals.items()}, served["log"].read_text()[-3000:])

    client = mlflow.MlflowClient(mlflow_server)
    found = {}
    for key, run in finals.items():
        pages = dict(resolve(mlflow_server, url) for url in summary_links(artifact(run.id).data))
        # the experiment's training runs, the run, its version, its gallery
        assert set(pages) == {"experiment", "run", "model_version", "artifact"}, pages
        found[key] = client.get_run(pages["run"][1])
        assert pages["model_version"][0] == "tinyssd-cancel-test"
    for key, overrides in (("resumed", RESUMED), ("other", OTHER)):
        params = found[key].data.params  # the train stage's (registry.* and evaluate.* are not among them)
        logged = {k: params[k] for k, _, _ in (o.partition("=") for o in overrides) if k in params}
        assert logged == {k: v for k, _, v in (o.partition("=") for o in overrides) if k in logged}, key
        assert {"base.seed", "train.epochs", "data.image_size", "train.batch_size"} <= set(logged), logged
    # The resumed run went on in the cancelled run's MLflow run, from its last checkpoint on: the epochs
    # up to it were logged before this run started, the others after.
    assert found["resumed"].info.run_id == cancelled_run and found["resumed"].info.status == "FINISHED"
    history = client.get_metric_history(cancelled_run, "loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    before = {m.step for m in history if m.timestamp < started_ms}
    assert 1 in before and max(before) <= cancelled_epoch, (before, cancelled_epoch)
    assert all(m.timestamp >= started_ms for m in history if m.step > cancelled_epoch)
    assert "**Resumed**" in artifact(finals["resumed"].id).data
    # Nothing kept any longer, no workspace left, and the deployment's checkout as it was.
    assert not any((project / KEPT_DIR).iterdir()) and not any(p.is_dir() for p in (project / RUNS_DIR).iterdir())
    assert checkout_state(project) == served["before"]
