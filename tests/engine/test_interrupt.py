"""SIGTERM (a Prefect Cancel, `kill`) and SIGINT stop `ssd train` cleanly: exit 128 + the signal, the
MLflow run KILLED, the workspace lock free, checkpoints kept; the rerun resumes the same run and
MLflow ends with every epoch logged."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from tiny_data import FAULTS, make_project, train_env
from ssd.util.files import exclusive_lock


def test_sigterm_ends_the_run_killed_frees_the_lock_and_the_rerun_resumes(tmp_path, mlflow_server):
    import mlflow

    project = make_project(tmp_path / "p")  # 2 epochs
    stopped = subprocess.run([sys.executable, FAULTS], cwd=project, capture_output=True, text=True, timeout=300,
                             env=train_env(mlflow_server, SSD_TEST_FAULT="term@2:1"))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == "ssd train: stopped by SIGTERM"
    assert sorted(p.name for p in (project / "models/checkpoints").glob("*.pt")) == ["epoch_0001.pt"]
    run_id = torch.load(project / "models/checkpoints/epoch_0001.pt", weights_only=True)["mlflow_run_id"]
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "KILLED"
    with exclusive_lock(project / "models/checkpoints.lock"):  # free: this would raise LockHeld
        pass

    rerun = subprocess.run([sys.executable, FAULTS], cwd=project, capture_output=True, text=True, timeout=300,
                           env=train_env(mlflow_server))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stderr
    assert json.loads((project / "models/mlflow_run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2]


def test_a_resumed_run_gets_the_epochs_it_never_logged(mlflow_server):
    import mlflow

    from ssd.mlops.training_run import Tracker

    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run() as run:
        mlflow.log_metrics({"loss": 1.0}, step=1)  # epoch 2 was checkpointed, then the server went away
        tracker = Tracker(active=True)
        tracker.run_id = run.info.run_id
        tracker.backfill([{"epoch": 1, "loss": 1.0, "class_err": 0.5}, {"epoch": 2, "loss": 0.7, "class_err": 0.4}])
    history = mlflow.MlflowClient(mlflow_server).get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.7)]


def test_a_tracking_server_dying_mid_training_leaves_no_gap_after_the_resume(tmp_path):
    """The server dies in epoch 2: the epoch's checkpoint is kept, the command exits 75; with the
    server back (same store), the rerun resumes the run and MLflow holds every epoch, 1 to 3."""
    import mlflow

    from servers import free_port, http_server

    store, port = tmp_path / "store", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
               "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    project = make_project(tmp_path / "p", epochs=3)
    with http_server(command, uri + "/health", tmp_path / "server1.log") as server:
        died = subprocess.run([sys.executable, FAULTS], cwd=project, capture_output=True, text=True, timeout=300,
                              env=train_env(uri, SSD_TEST_FAULT="killserver@2:1", SSD_TEST_SERVER_PGID=str(server.pid)))
    assert died.returncode == 75, died.stderr[-2000:]
    assert (project / "models/checkpoints/epoch_0002.pt").is_file()  # the epoch trained; its log did not land
    run_id = torch.load(project / "models/checkpoints/epoch_0002.pt", weights_only=True)["mlflow_run_id"]

    with http_server(command, uri + "/health", tmp_path / "server2.log"):
        rerun = subprocess.run([sys.executable, FAULTS], cwd=project, capture_output=True, text=True, timeout=300,
                               env=train_env(uri))
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "resuming from" in rerun.stderr
        history = mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
