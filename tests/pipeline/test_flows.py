"""The Prefect retraining flow against Prefect's real local server, on a tiny generated dataset.

Every flow runs the real stages (``dvc repro --single-item``) in a temporary copy of the project,
with the dataset served over HTTP on 127.0.0.1 and MLflow's embedded SQLite store in that copy.
"""
from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from flows import retrain as rt
from flows.stage_runner import StageFailed
from flows.workspace import experiment_name
from project_copy import copy_project, git_init
from servers import dead_port

REPO = Path(__file__).resolve().parents[2]
# Tiny but complete: 16 train / 8 val images of 160 px (the generator's minimum is 150; validate wants
# data.image_size to be the images' size), one epoch of two batches.
TINY = ["data.image_size=160", "train.epochs=1", "train.batch_size=8", "train.compile=false",
        "evaluate.gallery_images=2"]

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------
# fixtures: Prefect's server, projects, datasets, an HTTP server

@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` process (temporary database), started once for this module.

    Its services run as in production, the scheduler included; only its loop is shortened (2 s
    instead of 60 s) so that a schedule falling due during a test gets its run in time."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from servers import free_port, http_server

    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with http_server(command, api + "/health", home / "server.log", env=env, timeout=120):
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api
            # Flows ran in this process: their logs and events go out from background workers. Send
            # them while the server still answers; else Python's exit waits on each one retrying a dead
            # server (a minute and more per item: the suite once finished, then hung for an hour).
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=60)
            EventsWorker.drain_all(timeout=60)
    # The scheduler's services must not have failed on any loop (Prefect 3.8.8 with SQLAlchemy 2.1 did).
    errors = [line for line in (home / "server.log").read_text().splitlines() if "| ERROR" in line]
    assert not [line for line in errors if "schedule" in line], errors


@pytest.fixture(autouse=True)
def _quiet_dvc(monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def make_project(root: Path) -> Path:
    """A copy of the working tree (no pipeline outputs) as a fresh git repo with one commit: the
    deployment's checkout, whose HEAD each flow run's workspace starts from."""
    copy_project(root)
    git_init(root, {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@t"})
    return root


def checkout_state(root: Path) -> tuple[str, bytes]:
    """What a flow run must leave as it was: git's view of the checkout and the params file."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    return status.stdout, (root / "params.yaml").read_bytes()


def experiments(root: Path) -> dict[str, dict]:
    """``dvc exp show --json`` in ``root``: each experiment's name -> its params.yaml and metrics."""
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True,
                           text=True, check=True)
    return {exp["name"]: exp["revs"][0]["data"] for base in json.loads(shown.stdout)
            for exp in base.get("experiments") or []}


def build_zips(folder: Path) -> dict[str, bytes]:
    """A good archive and one whose train labels hold an impossible box."""
    from ssd.data.synthetic import generate_archive

    good = folder / "good.zip"
    generate_archive(good, seed=0, train=16, val=8, image_size=160)
    corrupt = folder / "corrupt.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(corrupt, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("bananas_train/label.csv"):
                lines = data.decode().splitlines()
                name, label, x1, y1, x2, y2 = lines[3].split(",")
                lines[3] = ",".join([name, label, x2, y1, x1, y2])  # xmin > xmax on csv line 4
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    return {"/good.zip": good.read_bytes(), "/corrupt.zip": corrupt.read_bytes()}


class FlakyServer:
    """Serves archives on 127.0.0.1; the next ``fail[path]`` GET requests for a path get HTTP 503.

    HEAD requests (the `source` stage's check) answer with the archive's ETag and length; they never
    fail and are not in ``log``, which lists the GET requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.fail, self.log = files, {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                body = outer.files.get(self.path)
                self.send_response(404 if body is None else 200)
                if body is not None:
                    self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()[:16]}"')
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()

            def do_GET(self) -> None:
                if outer.fail.get(self.path, 0) > 0:
                    outer.fail[self.path] -= 1
                    code, body = 503, b"try later"
                elif self.path in outer.files:
                    code, body = 200, outer.files[self.path]
                else:
                    code, body = 404, b"no such file"
                outer.log.append((self.path, code))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def archive_server(tmp_path_factory):
    server = FlakyServer(build_zips(tmp_path_factory.mktemp("zips")))
    yield server
    server.close()


def run_flow(**kwargs):
    """Run the flow in this process; returns its final state (failures do not raise)."""
    return rt.retrain(**kwargs, fetch_backoff_s=0.2, return_state=True)


def task_runs(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return {run.name.rsplit("-", 1)[0]: run for run in asyncio.run(read())}


def flow_run_name(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).name

    return asyncio.run(read())


def log_lines(flow_run_id) -> list[str]:
    """The flow run's log messages as stored by the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs travel in batches: send what is still queued

    async def read():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in asyncio.run(read())]


def artifact(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[rt.ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    found = asyncio.run(read())
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def trained(prefect_api, archive_server, tmp_path_factory):
    """The whole flow, once, on a fresh project whose dataset server answers 503 until ``ssd fetch``
    has given up once: the fetch task then succeeds on its Prefect retry."""
    from ssd.data.download import RETRIES

    project = make_project(tmp_path_factory.mktemp("project"))
    before = checkout_state(project)
    archive_server.fail["/good.zip"] = RETRIES + 1  # every attempt of the first `ssd fetch`
    archive_server.log.clear()
    started = time.monotonic()
    state = run_flow(project_dir=str(project), overrides=TINY, nproc=2, source=archive_server.url("/good.zip"))
    return {"project": project, "state": state, "log": list(archive_server.log), "seconds": time.monotonic() - started,
            "checkout_before": before, "parameters": {"overrides": TINY, "nproc": 2,
                                                      "source": archive_server.url("/good.zip")}}


# ----------------------------------------------------------------------------------------------
# unit-level: params handling, transient classification, the summary

def test_write_params_keeps_comments_and_checks_keys(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_text()
    changed = rt.write_params(path, rt.flow_overrides(["train.epochs=3"], 2, "http://h:1/x.zip"))
    assert changed == ["train.epochs=3", "train.nproc=2", 'data.source="http://h:1/x.zip"']
    from ssd.util.params import load_params

    params = load_params(path)
    assert (params["train"]["epochs"], params["train"]["nproc"], params["data"]["source"]) == (3, 2, "http://h:1/x.zip")
    # Only the three values changed; every comment and every other line is as it was.
    diff = [(a, b) for a, b in zip(before.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(diff) == 3 and len(before.splitlines()) == len(path.read_text().splitlines())
    assert "# torchrun --nproc-per-node" in path.read_text()
    assert rt.write_params(path, ["train.epochs=3"]) == []  # no change: file untouched
    with pytest.raises(ValueError, match="train.epoch"):
        rt.write_params(path, ["train.epoch=3"])
    written = path.read_text()
    with pytest.raises(ValueError, match=r"^-S train.epochs=1.5: expected an integer >= 1$"):  # the params schema
        rt.write_params(path, ["train.epochs=1.5"])
    assert path.read_text() == written
    with pytest.raises(ValueError, match="nproc"):
        rt.flow_overrides([], 0, None)


def test_stage_failure_is_transient_exactly_when_its_command_exited_75(tmp_path):
    project = make_project(tmp_path)
    # A fetch from a port where nothing listens: `ssd fetch` exits 75 (dvc repro itself exits 255).
    rt.write_params(project / "params.yaml", [f'data.source="http://127.0.0.1:{dead_port()}/x.zip"'])
    with pytest.raises(rt.TransientStageFailure, match=r"stage 'fetch' failed: .*cannot reach") as info:
        rt.run_stage("fetch", project, log=lambda line: None)
    assert info.value.exit_status == 75
    # A missing zip is refused input: exit 1, not transient.
    rt.write_params(project / "params.yaml", ['data.source="/nonexistent/x.zip"'])
    with pytest.raises(StageFailed, match=r"stage 'fetch' failed: .*nonexistent") as info:
        rt.run_stage("fetch", project, log=lambda line: None)
    assert not isinstance(info.value, rt.TransientStageFailure) and info.value.exit_status == 1


@pytest.mark.parametrize("register, decision, aliases, standing", [
    ("ran", "promoted", ["challenger", "champion"], "**became champion**"),
    ("ran", "kept", ["challenger"], "**not champion**"),
    ("skipped", "promoted", ["challenger", "champion"], "**is champion**"),  # promoted by an earlier run
])
def test_summary_names_version_and_champion_decision(register, decision, aliases, standing):
    results = {"train": {"loss": 0.25, "epochs": 1}, "eval": {"map_50": 0.5, "note": "text is left out"},
               "registration": {"model_name": "tinyssd", "version": 3, "aliases": aliases, "decision": decision}}
    markdown = rt.summary_markdown(results, {"fetch": "skipped", "register": register}, ["train.epochs=1"])
    assert "version **3**" in markdown and standing in markdown
    assert "| reports/train.json | loss | 0.25 |" in markdown and "| reports/eval.json | map_50 | 0.5 |" in markdown
    assert "note" not in markdown and f"| register | {register} |" in markdown and "`train.epochs=1`" in markdown


def test_prefect_yaml_schedule_matches_code():
    import yaml

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    assert deployment["name"] == rt.DEPLOYMENT_NAME
    assert deployment["entrypoint"] == "flows/retrain.py:retrain"
    assert deployment["schedules"] == [{"cron": rt.WEEKLY_CRON, "timezone": rt.TIMEZONE}]


# ----------------------------------------------------------------------------------------------
# the flow on Prefect's server

def test_flow_end_to_end_with_flaky_fetch(trained):
    from ssd.data.download import RETRIES

    state, project = trained["state"], trained["project"]
    assert state.is_completed(), state
    result = state.result()
    assert result["stages"] == {s: "ran" for s in rt.STAGES}
    # The first `ssd fetch` met only 503s and gave up; Prefect retried the task, which then got the zip.
    assert trained["log"] == [("/good.zip", 503)] * (RETRIES + 1) + [("/good.zip", 200)]
    runs = task_runs(state.state_details.flow_run_id)
    assert set(runs) == set(rt.STAGES)
    assert runs["fetch"].run_count == 2 and runs["fetch"].state.is_completed()
    assert all(runs[s].run_count == 1 for s in rt.STAGES[1:])
    # nproc=2 reached torchrun through train.nproc; the stage's output arrived in Prefect line by line.
    assert result["train"]["world_size"] == 2
    logs = log_lines(state.state_details.flow_run_id)
    assert "> torchrun --standalone --nproc-per-node 2 -m ssd train" in logs
    assert {"> ssd source", "> ssd fetch --fingerprint data/source.json", "> ssd validate", "> ssd evaluate",
            "> ssd register"} <= set(logs)
    assert any("examples/sec" in line and "\n" not in line for line in logs), logs[-20:]
    # The run worked in its own workspace: the deployment's checkout is as it was, the workspace is
    # gone, and the run is a DVC experiment named after the flow run, with its params and metrics.
    assert checkout_state(project) == trained["checkout_before"]
    assert not any((project / ".dvc/tmp/flow-runs").glob("*/"))
    name = result["experiment"]["experiment"]
    assert name == experiment_name(flow_run_name(state.state_details.flow_run_id))
    shown = experiments(project)[name]
    assert shown["params"]["params.yaml"]["data"]["train"]["nproc"] == 2
    assert shown["metrics"]["reports/eval.json"]["data"]["map_50"] == pytest.approx(result["eval"]["map_50"])
    lock = subprocess.run(["git", "show", f"{result['experiment']['rev']}:dvc.lock"], cwd=project, capture_output=True,
                          text=True, check=True).stdout
    assert "--nproc-per-node 2" in lock
    # The run's summary: metrics from both reports, model version 1, promoted to champion (the first).
    reg = result["registration"]
    assert reg["version"] == 1 and "champion" in reg["aliases"]
    markdown = artifact(state.state_details.flow_run_id).data
    assert "version **1**" in markdown and "**became champion**" in markdown
    assert f"**DVC experiment** `{name}`" in markdown
    assert "| reports/eval.json | map_50 |" in markdown and "| reports/train.json |" in markdown
    assert "`train.epochs=1`" in markdown


def test_failed_stage_fails_flow_naming_it(prefect_api, archive_server, tmp_path):
    project = make_project(tmp_path)
    state = run_flow(project_dir=str(project), overrides=TINY, source=archive_server.url("/corrupt.zip"))
    assert state.is_failed()
    with pytest.raises(StageFailed, match=r"stage 'validate' failed: (.|\n)*label.csv row 4: .*xmin"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["fetch"].state.is_completed() and runs["validate"].state.is_failed()
    assert "train" not in runs and not (project / "models" / "model.pt").exists()


def test_permanent_fetch_error_is_not_retried(prefect_api, archive_server, tmp_path):
    project = make_project(tmp_path)
    archive_server.log.clear()
    state = run_flow(project_dir=str(project), overrides=TINY, source=archive_server.url("/missing.zip"))
    assert state.is_failed()
    with pytest.raises(StageFailed, match=r"stage 'fetch' failed: (.|\n)*HTTP 404"):
        state.result()
    assert archive_server.log == [("/missing.zip", 404)]  # one request: neither ssd fetch nor Prefect retried
    assert task_runs(state.state_details.flow_run_id)["fetch"].run_count == 1


def _fetch_only(project: Path, source: str):
    """A flow of the real fetch task alone (its retries, no delay) on ``project``; its final state."""
    from prefect import flow

    rt.write_params(project / "params.yaml", TINY + [f'data.source="{source}"'])

    @flow(name="fetch-only")
    def fetch_only() -> str:
        return rt.fetch.with_options(retry_delay_seconds=0)(str(project))

    return fetch_only(return_state=True)


def test_task_retries_on_exit_75_and_only_then(prefect_api, archive_server, tmp_path):
    from ssd.data.download import RETRIES

    # Every attempt of the first `ssd fetch` gets 503: it gives up, exit 75; the task's retry gets the zip.
    archive_server.fail["/good.zip"] = RETRIES + 1
    archive_server.log.clear()
    state = _fetch_only(make_project(tmp_path / "flaky"), archive_server.url("/good.zip"))
    assert state.is_completed(), state
    assert archive_server.log == [("/good.zip", 503)] * (RETRIES + 1) + [("/good.zip", 200)]
    assert task_runs(state.state_details.flow_run_id)["fetch"].run_count == 2

    # A 404 is refused input: exit 1, the same task is not retried.
    archive_server.log.clear()
    state = _fetch_only(make_project(tmp_path / "missing"), archive_server.url("/missing.zip"))
    assert state.is_failed()
    with pytest.raises(StageFailed, match="HTTP 404") as info:
        state.result()
    assert info.value.exit_status == 1 and archive_server.log == [("/missing.zip", 404)]
    assert task_runs(state.state_details.flow_run_id)["fetch"].run_count == 1


# ----------------------------------------------------------------------------------------------
# schedules: the server's own scheduler creates the runs (the tests never trigger them)

def cron_due_soon(lead_s: float = 20.0) -> tuple[str, datetime]:
    """A UTC cron that falls due once during the test: the first whole minute at least ``lead_s``
    from now (time to register the deployment and for the scheduler to create its run)."""
    due = (datetime.now(timezone.utc) + timedelta(seconds=lead_s, minutes=1)).replace(second=0, microsecond=0)
    return f"{due.minute} {due.hour} * * *", due


def deployment_runs(name: str) -> list:
    """The flow runs of deployment ``flow/deployment`` (none while it does not exist yet)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound

    async def read():
        async with get_client() as client:
            try:
                deployment = await client.read_deployment_by_name(name)
            except ObjectNotFound:
                return []
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))

    return asyncio.run(read())


def wait_for_scheduled_run(name: str, due: datetime, proc: subprocess.Popen, log_path: Path, timeout: float):
    """Wait until the run the scheduler created for ``due`` has finished; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in deployment_runs(name) if r.auto_scheduled and r.expected_start_time == due]
        if runs and runs[0].state.is_final():
            return runs[0]
        if proc.poll() is not None or time.monotonic() > deadline:
            states = [(r.expected_start_time, r.state_name, r.auto_scheduled) for r in deployment_runs(name)]
            raise AssertionError(f"no finished run due {due} for {name}: {states}\n{log_path.read_text()[-3000:]}")
        time.sleep(2)


def test_schedule_fires_served_deployment(prefect_api, archive_server, tmp_path):
    """The README's `python -m flows.retrain serve` on a fresh project, with a cron that falls due
    in a minute: the server's scheduler creates the run and serve executes it: a real retraining."""
    from servers import process_group

    project = make_project(tmp_path / "project")
    before = checkout_state(project)
    cron, due = cron_due_soon()
    command = [sys.executable, "-m", "flows.retrain", "serve", "--name", "daily-test", "--cron", cron,
               "--source", archive_server.url("/good.zip")] + [a for item in TINY for a in ("-S", item)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log_path = tmp_path / "serve.log"
    with process_group(command, log_path, env=env, cwd=project) as proc:
        run = wait_for_scheduled_run(f"{rt.FLOW_NAME}/daily-test", due, proc, log_path, timeout=300)
    assert run.state.is_completed(), (run.state, log_path.read_text()[-3000:])
    markdown = artifact(run.id).data
    assert all(f"| {stage} | ran |" in markdown for stage in rt.STAGES), markdown
    assert "version **1**" in markdown and "**became champion**" in markdown
    assert checkout_state(project) == before and experiment_name(run.name) in experiments(project)


def test_schedule_fires_on_process_worker(trained, prefect_api, tmp_path):
    """The README's cluster path on a real server: `prefect work-pool create`, `prefect deploy` from
    prefect.yaml and `prefect worker start`. The weekly schedule fills the deployment's upcoming runs
    with Mondays 03:00 UTC; the same file with a cron due in a minute gets its run executed by the
    worker. The deployment's parameters are the trained run's, so that run continues from the trained
    run's experiment, where every stage is up to date."""
    from servers import process_group

    project = trained["project"]
    name = f"{rt.FLOW_NAME}/{rt.DEPLOYMENT_NAME}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1"}

    def prefect(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=project, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    prefect("work-pool", "create", "tinyssd-test", "--type", "process")
    prefect("deploy", "--name", rt.DEPLOYMENT_NAME, "--pool", "tinyssd-test", "--no-prompt")
    deadline = time.monotonic() + 30
    while not (upcoming := [r for r in deployment_runs(name) if r.auto_scheduled]) and time.monotonic() < deadline:
        time.sleep(1)
    assert upcoming, "the scheduler created no runs for the weekly deployment"
    for run in upcoming:
        start = run.expected_start_time.astimezone(timezone.utc)
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0), start  # Mondays 03:00 UTC

    cron, due = cron_due_soon()
    config = project / "prefect.yaml"
    text = config.read_text().replace(f'cron: "{rt.WEEKLY_CRON}"', f'cron: "{cron}"')
    config.write_text(text.replace("parameters: {}", f"parameters: {json.dumps(trained['parameters'])}"))
    prefect("deploy", "--name", rt.DEPLOYMENT_NAME, "--pool", "tinyssd-test", "--no-prompt")
    log_path = tmp_path / "worker.log"
    with process_group([sys.executable, "-m", "prefect", "worker", "start", "--pool", "tinyssd-test"], log_path,
                       env=env, cwd=project) as proc:
        run = wait_for_scheduled_run(name, due, proc, log_path, timeout=240)
    assert run.state.is_completed(), (run.state, log_path.read_text()[-3000:])
    markdown = artifact(run.id).data
    assert "| train | skipped |" in markdown and "**is champion**" in markdown, markdown
