"""Training loses nothing: a bad start keeps the checkpoints, and one training per workspace at a time."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from ssd.cli import main as cli_main
from faults import fault_hook
from tiny_data import FAULTS, make_project, train_env


def _checkpoints(project):
    return {p.name: p.read_bytes() for p in sorted((project / "models/checkpoints").glob("*.pt"))}


def _runs(uri):
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tinyssd")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.fixture()
def trained(tmp_path, monkeypatch, mlflow_server):
    """A project with the two checkpoints of a finished 2-epoch run; the cwd and MLflow set to it."""
    project = make_project(tmp_path / "p", images=4)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli_main(["train"]) == 0
    assert len(_checkpoints(project)) == 2
    return project


def test_bad_start_keeps_every_checkpoint_and_makes_no_run(trained, mlflow_server, capsys):
    before, runs = _checkpoints(trained), len(_runs(mlflow_server))
    assert cli_main(["train", "--data", "nowhere", "-S", "train.lr=0.1"]) == 1
    assert "dataset folder not found: nowhere" in capsys.readouterr().err
    assert cli_main(["train", "-S", "train.batch_size=0"]) == 1
    assert "train.batch_size" in capsys.readouterr().err
    assert _checkpoints(trained) == before and len(_runs(mlflow_server)) == runs


def test_new_run_replaces_old_checkpoints_only_after_its_first_epoch(trained, mlflow_server, monkeypatch):
    before = _checkpoints(trained)
    # A fresh run (other params) that fails in its first epoch: the old run's checkpoints all stay.
    monkeypatch.setattr("ssd.engine.step._step_hooks", [fault_hook("nan@1:1")])
    with pytest.warns(UserWarning, match="different params; starting fresh"):
        assert cli_main(["train", "-S", "train.lr=0.1"]) == 1
    assert _checkpoints(trained) == before
    # The same fresh run, once it has finished its first epoch, owns the folder.
    monkeypatch.setattr("ssd.engine.step._step_hooks", [])
    with pytest.warns(UserWarning, match="different params; starting fresh"):
        assert cli_main(["train", "-S", "train.lr=0.1", "-S", "train.epochs=1"]) == 0
    after = _checkpoints(trained)
    assert list(after) == ["epoch_0001.pt"] and after["epoch_0001.pt"] != before["epoch_0001.pt"]
    ckpt = torch.load(trained / "models/checkpoints/epoch_0001.pt", weights_only=True)
    assert ckpt["params"]["train"]["lr"] == 0.1


def test_second_training_is_refused_while_the_first_holds_the_workspace(tmp_path, mlflow_server):
    project = make_project(tmp_path / "p", images=4)
    holder = subprocess.Popen([sys.executable, FAULTS], cwd=project, stderr=subprocess.PIPE,
                              env=train_env(mlflow_server, SSD_TEST_FAULT="stop@1:1"))
    try:
        deadline = time.monotonic() + 120
        while not _stopped(holder.pid):  # stopped inside its first step, the lock held
            assert holder.poll() is None and time.monotonic() < deadline, "the first training never started"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "ssd", "train"], cwd=project, env=train_env(mlflow_server),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert f"another training is using models/checkpoints: held by pid {holder.pid}" in second.stderr
        assert "since 20" in second.stderr and not (project / "models/model.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # A dead holder holds nothing: the next training runs.
    third = subprocess.run([sys.executable, "-m", "ssd", "train"], cwd=project, env=train_env(mlflow_server),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert (project / "models/model.pt").is_file()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"
