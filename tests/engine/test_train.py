"""The training stage: outputs, checkpoints and resume, crash recovery, non-finite loss, settings."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from ssd.cli import main as cli_main
from ssd.core.model import load_model
from ssd.data.dataset import load_dataset, make_loader
from ssd.engine.checkpoint import data_fingerprint, resume_key
from ssd.engine.precision import resolve_precision
from ssd.engine.setup import keep_on_device
from ssd.engine.step import register_step_hook
from faults import fault_hook
from tiny_data import FAULTS, make_project, train_env, write_dataset


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_train_outputs_then_resume_extends_the_same_run(tmp_path, monkeypatch, mlflow_server):
    import mlflow

    project = make_project(tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli_main(["train"]) == 0

    net = load_model("models/model.pt")
    assert net.config.classes == ["banana"]
    metrics = json.loads((project / "reports/train.json").read_text())
    assert metrics["epochs"] == 2 and metrics["world_size"] == 1 and metrics["compute_dtype"] == "fp32"
    assert 0 <= metrics["class_err"] <= 1 and metrics["bbox_mae"] >= 0 and metrics["examples_per_sec"] > 0
    rows = list(csv.DictReader((project / "reports/train_history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "loss", "class_err", "bbox_mae", "examples_per_sec"}
    ckpts = sorted(p.name for p in (project / "models/checkpoints").iterdir())
    assert ckpts == ["epoch_0001.pt", "epoch_0002.pt"]
    ckpt = torch.load(project / "models/checkpoints/epoch_0002.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2 and ckpt["params"]["train"]["lr"] == 0.2
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"]) and "optimizer" in ckpt
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert ckpt["mlflow_run_id"] == run_id
    first_name = mlflow.MlflowClient(mlflow_server).get_run(run_id).info.run_name
    # The final model is the last checkpoint's weights.
    for key, value in _state("models/model.pt").items():
        assert torch.equal(value, ckpt["model"][key]), key

    # More epochs: resumes at epoch 3 in the same MLflow run.
    assert cli_main(["train", "-S", "train.epochs=3"]) == 0
    rows = list(csv.DictReader((project / "reports/train_history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert json.loads((project / "models/mlflow_run.json").read_text())["run_id"] == run_id
    client = mlflow.MlflowClient(mlflow_server)
    history = client.get_metric_history(run_id, "class_err")
    assert sorted(m.step for m in history) == [1, 2, 3]
    run = client.get_run(run_id)  # the resumed run keeps its name, and its inputs are not logged twice
    assert run.info.run_name.startswith("train-") and run.info.run_name == first_name
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["bananas_train", "bananas_val"]

    # Different params: the checkpoints are not reused, a new run starts.
    with pytest.warns(UserWarning, match="different params; starting fresh"):
        assert cli_main(["train", "-S", "train.epochs=1", "-S", "train.lr=0.1"]) == 0
    new_run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert new_run_id != run_id
    assert len(list(csv.DictReader((project / "reports/train_history.csv").open()))) == 1
    # Two trainings, two names (the seeded RNG once gave every run the same generated name).
    new_name = client.get_run(new_run_id).info.run_name
    assert new_name.startswith("train-") and new_name != first_name


def test_sigkill_mid_epoch_then_rerun_matches_uninterrupted_run(tmp_path, mlflow_server):
    # Momentum and an RNG-dependent step: a resume that skipped the optimizer's or the RNG's state
    # would not match the uninterrupted run.
    cmd = [sys.executable, FAULTS]
    whole = make_project(tmp_path / "whole", momentum=0.9)
    subprocess.run(cmd, cwd=whole, env=train_env(mlflow_server, SSD_TEST_FAULT="rng"), check=True,
                   capture_output=True, timeout=300)

    crashed = make_project(tmp_path / "crashed", momentum=0.9)
    killed = subprocess.run(cmd, cwd=crashed, env=train_env(mlflow_server, SSD_TEST_FAULT="rng,kill@2:1"),
                            capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (crashed / "models/model.pt").exists()
    assert sorted(p.name for p in (crashed / "models/checkpoints").glob("*.pt")) == ["epoch_0001.pt"]
    run_id = torch.load(crashed / "models/checkpoints/epoch_0001.pt", weights_only=True)["mlflow_run_id"]
    assert not (crashed / "models/mlflow_run.json").exists()  # written with the model, never without it

    rerun = subprocess.run(cmd, cwd=crashed, env=train_env(mlflow_server, SSD_TEST_FAULT="rng"),
                           capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert "resuming from" in rerun.stderr.decode()
    assert json.loads((crashed / "models/mlflow_run.json").read_text())["run_id"] == run_id
    expected, got = _state(whole / "models/model.pt"), _state(crashed / "models/model.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"


def test_nonfinite_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, mlflow_server):
    import mlflow

    project = make_project(tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setattr("ssd.engine.step._step_hooks", [fault_hook("nan@2:1")])
    monkeypatch.setenv("SSD_DEBUG", "1")  # let the CLI re-raise instead of printing
    with pytest.raises(RuntimeError, match=r"non-finite loss at epoch 2 step 1.*epoch_0001\.pt"):
        cli_main(["train"])
    assert sorted(p.name for p in (project / "models/checkpoints").glob("*.pt")) == ["epoch_0001.pt"]
    good = torch.load(project / "models/checkpoints/epoch_0001.pt", weights_only=True)
    assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert not (project / "models/model.pt").exists() and not (project / "reports/train.json").exists()
    run_id = good["mlflow_run_id"]
    assert mlflow.MlflowClient(mlflow_server).get_run(run_id).info.status == "FAILED"


def test_cli_reports_user_errors(tmp_path, monkeypatch, capsys):
    project = make_project(tmp_path / "p", images=4)
    monkeypatch.chdir(project)
    assert cli_main(["train", "--data", "nowhere"]) == 1
    assert "dataset folder not found: nowhere" in capsys.readouterr().err
    assert cli_main(["train", "-S", "train.precision=fp8"]) == 1
    assert "-S train.precision=fp8: expected one of auto, fp32, bf16, fp16" in capsys.readouterr().err


def test_precision_and_resume_key():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16, fp16"):
        resolve_precision("half", cpu)
    # Everything but train.epochs must match for a resume.
    a = {"base": {"seed": 0}, "data": {}, "model": {}, "train": {"epochs": 5, "lr": 0.2}}
    assert resume_key(a) == resume_key({**a, "train": {"epochs": 9, "lr": 0.2}})
    assert resume_key(a) != resume_key({**a, "train": {"epochs": 5, "lr": 0.1}})


def test_step_hooks_see_every_step_until_removed(tmp_path, monkeypatch, mlflow_server):
    from ssd.engine import step

    project = make_project(tmp_path / "p", images=8, batch_size=4)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    seen = []
    remove = register_step_hook(lambda s: seen.append((s.epoch, s.step, len(s.images), s.loss.ndim)))
    try:
        assert cli_main(["train"]) == 0
    finally:
        remove()
    remove()  # twice is harmless
    assert seen == [(1, 1, 4, 0), (1, 2, 4, 0), (2, 1, 4, 0), (2, 2, 4, 0)] and step._step_hooks == []


def test_code_fingerprint_covers_the_training_code():
    from ssd.engine.checkpoint import CODE_MODULES
    from code_graph import code_deps

    training = {p for p in code_deps("ssd.engine.loop") if p.startswith(("ssd/core/", "ssd/engine/"))}
    covered = {name.replace(".", "/") + ".py" for name in CODE_MODULES}
    # Process plumbing and reports change neither the weights nor what a checkpoint holds.
    assert training - covered == {"ssd/engine/distributed.py", "ssd/engine/history.py"}
    assert "ssd/data/dataset.py" in covered


def test_data_fingerprint_tracks_labels(tmp_path):
    from ssd.data.dataset import load_dataset
    from tiny_data import write_dataset

    a = load_dataset(write_dataset(tmp_path / "a", train=4, val=1), "train", 64)
    b = load_dataset(write_dataset(tmp_path / "b", train=4, val=1, seed=5), "train", 64)
    assert data_fingerprint(a) == data_fingerprint(a) != data_fingerprint(b)


def test_dataset_stays_on_the_host_unless_a_gpu_has_room(tmp_path, monkeypatch):
    dataset = load_dataset(write_dataset(tmp_path, train=4, val=2), "train", 64)
    images = dataset.images
    assert not keep_on_device(dataset, torch.device("cpu"), num_workers=0)
    # Workers cannot hand out CUDA tensors; a GPU without room keeps it too (no GPU needed to check).
    assert not keep_on_device(dataset, torch.device("cuda"), num_workers=2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * images.nbytes, 10 * images.nbytes))
    assert not keep_on_device(dataset, torch.device("cuda"), num_workers=0)
    assert dataset.images is images and dataset.images.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dataset_on_the_gpu_gives_batches_there(tmp_path):
    dataset = load_dataset(write_dataset(tmp_path, train=4, val=2), "train", 64)
    host = dataset.images.clone()
    assert keep_on_device(dataset, torch.device("cuda"), num_workers=0)
    images, labels = next(iter(make_loader(dataset, 2, shuffle=False)))
    assert images.is_cuda and labels.is_cuda and torch.equal(images.cpu(), host[:2])


def _set_loader(project, loader):
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["loader"] = loader
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def test_streamed_training_killed_and_resumed_matches_training_in_memory(tmp_path, mlflow_server):
    # The loader paths give the same batches, so the same weights, through a resume too; augmentation
    # and momentum make any difference in images, labels or order show.
    cmd = [sys.executable, FAULTS]
    memory = _set_loader(make_project(tmp_path / "memory", momentum=0.9, augment=True), "memory")
    subprocess.run(cmd, cwd=memory, env=train_env(mlflow_server), check=True, capture_output=True, timeout=300)
    stream = _set_loader(make_project(tmp_path / "stream", momentum=0.9, augment=True), "stream")
    killed = subprocess.run(cmd, cwd=stream, env=train_env(mlflow_server, SSD_TEST_FAULT="kill@2:1"),
                            capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    rerun = subprocess.run(cmd, cwd=stream, env=train_env(mlflow_server), capture_output=True, timeout=300)
    assert rerun.returncode == 0 and "resuming from" in rerun.stderr.decode(), rerun.stderr.decode()[-2000:]
    expected, got = _state(memory / "models/model.pt"), _state(stream / "models/model.pt")
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs between the loader paths"


@pytest.mark.parametrize("loader, num_workers", [("memory", 0), ("stream", 0), ("stream", 3), ("auto", 0)])
def test_workers_are_sized_from_the_machine_unless_given(tmp_path, loader, num_workers):
    from pathlib import Path

    from ssd.data.dataset import DetectionDataset, StreamDataset, decode_workers
    from ssd.engine.distributed import DistInfo
    from ssd.engine.setup import build
    from ssd.util.params import load_settings

    params = Path(__file__).parents[2] / "params.yaml"
    settings = load_settings(params, [f"data.loader={loader}", "data.image_size=64",
                                      f"train.num_workers={num_workers}"])
    setup = build(settings, write_dataset(tmp_path, train=4, val=1),
                  DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    streamed = loader == "stream"  # auto holds 4 images in memory
    assert isinstance(setup.dataset, StreamDataset if streamed else DetectionDataset)
    assert setup.loader.num_workers == (num_workers or (decode_workers() if streamed else 0))
    assert not setup.loader.pin_memory  # nothing to pin for on a CPU
