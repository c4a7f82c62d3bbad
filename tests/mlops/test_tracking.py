"""MLflow tracking of a training run against a real `mlflow server`, and lineage: provenance on
runs, model versions and reports, dataset inputs, run names, version descriptions."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from ssd.cli import main as cli_main
from ssd.mlops.provenance import PROVENANCE_KEYS, data_source, dvc_md5, provenance
from ssd.mlops.tracking import read_run_file
from ssd.mlops.training_run import flatten_params, run_name
from tiny_data import make_project, train_env

URL = "http://example.invalid/banana-detection.zip"


def _git_project(project: Path) -> str:
    """``project`` as a git repository with params.yaml committed; returns the commit."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "p"], cwd=project, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()


def test_training_run_is_recorded_on_the_tracking_server(tmp_path, monkeypatch, mlflow_server):
    import mlflow

    project = make_project(tmp_path / "p")
    (project / "data/raw/manifest.json").write_text(json.dumps({"resolved_source": "synthetic", "sha1": "abc123",
                                                                 "synthetic": {"seed": 3}}))
    commit = _git_project(project)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert cli_main(["train"]) == 0

    info = read_run_file()
    assert info["tracking_uri"] == mlflow_server
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(info["run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["train.lr"] == "0.2" and params["train.batch_size"] == "4" and params["train.epochs"] == "2"
    assert params["data.image_size"] == "64" and params["model.ratios"] == "[1, 2, 0.5]" and params["base.seed"] == "0"
    assert tags["data_source"] == "synthetic:seed=3" and tags["data_synthetic_fallback"] == "false"
    assert tags["data_hash"] == "dvc-md5:" + dvc_md5(project / "data/raw")["."]
    assert tags["device"] == "cpu" and tags["world_size"] == "1" and tags["precision"] == "fp32"
    assert tags["git_commit"] == commit and tags["git_dirty"] == "false"
    assert re.fullmatch(rf"train-{commit[:7]}-\d{{8}}T\d{{6}}Z", run.info.run_name)
    for key in ("class_err", "bbox_mae", "loss", "examples_per_sec"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert run.info.status == "FINISHED"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "train_curve.png"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.pt"]
    local = client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path))
    assert torch.load(local, weights_only=True)["epoch"] == 2
    png = client.download_artifacts(run.info.run_id, "train_curve.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_unreachable_tracking_server_refuses_to_start(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    project = make_project(tmp_path / "p", images=4)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert cli_main(["train"]) == 75  # transient: the flow retries it later
    err = capsys.readouterr().err
    assert f"transient error (retry later): MLflow tracking server http://127.0.0.1:{port} is unreachable" in err
    assert not (project / "models").exists() and not (project / "reports").exists()


def test_flatten_params():
    flat = flatten_params({"train": {"lr": 0.2, "nested": {"a": [1, 2]}}, "base": {"seed": 0}})
    assert flat == {"train.lr": "0.2", "train.nested.a": "[1, 2]", "base.seed": "0"}


@pytest.mark.parametrize("uri", ["sqlite:///x.db", "file:///tmp/mlruns"])
def test_store_uris_need_no_server(uri):
    from ssd.mlops.tracking import ensure_reachable

    assert ensure_reachable(uri) == uri


def test_dvc_md5_is_what_dvc_records(tmp_path):
    from tiny_data import write_dataset

    data = tmp_path / "data"
    write_dataset(data, train=3, val=2)
    (data / "manifest.json").write_text("{}")
    shutil.copytree(data / "banana-detection/bananas_val", tmp_path / "bananas_val")  # a split on its own
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "add", "-q", "data", "bananas_val"], cwd=tmp_path, check=True)
    recorded = [re.search(r"md5: (\S+)", (tmp_path / f).read_text()).group(1) for f in ("data.dvc", "bananas_val.dvc")]
    hashes = dvc_md5(data)
    assert [hashes["."], hashes["banana-detection/bananas_val"]] == recorded
    assert dvc_md5(tmp_path / "absent") == {}


def test_provenance_keys_and_data_sources(tmp_path):
    from tiny_data import write_dataset

    root = write_dataset(tmp_path / "raw")
    outside_git = provenance(root, cwd=tmp_path)
    assert tuple(outside_git) == PROVENANCE_KEYS and all(isinstance(v, str) for v in outside_git.values())
    # No manifest: the dataset folder itself is hashed and named as the source.
    assert outside_git == {"git_commit": "unknown", "git_dirty": "unknown",
                           "data_hash": "dvc-md5:" + dvc_md5(root)["."], "data_source": str(root.resolve()),
                           "data_synthetic_fallback": "false"}
    # ssd fetch's layout: data/raw (manifest included) is what identifies the data.
    manifest = {"resolved_source": "synthetic", "synthetic_fallback": True, "synthetic": {"seed": 7}}
    (tmp_path / "raw/manifest.json").write_text(json.dumps(manifest))
    fetched = provenance(root, cwd=tmp_path)
    assert fetched["data_hash"] == "dvc-md5:" + dvc_md5(tmp_path / "raw")["."] != outside_git["data_hash"]
    assert (fetched["data_source"], fetched["data_synthetic_fallback"]) == ("synthetic:seed=7", "true")
    assert data_source({"resolved_source": "d2l", "url": URL}, tmp_path) == URL
    assert data_source({"resolved_source": "file", "path": "/zips/b.zip"}, tmp_path) == "/zips/b.zip"


def test_git_dirty_ignores_the_pipelines_own_outputs(tmp_path):
    """dvc repro rewrites dvc.lock and committed reports between stages, and `dvc exp run -S` writes
    params.yaml before them (the values are the run's params); only other changes are dirt."""
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: x\n    metrics:\n      - out.json:\n"
                                       "          cache: false\n")
    (tmp_path / "out.json").write_text("{}")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    commit = _git_project(tmp_path)
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run(["git", "add", "dvc.yaml", "out.json", "dvc.lock", "code.py"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "o"], cwd=tmp_path,
                   check=True)
    assert provenance(tmp_path, cwd=tmp_path)["git_commit"] != commit  # the second commit
    (tmp_path / "out.json").write_text('{"map": 1}')
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert provenance(tmp_path, cwd=tmp_path)["git_dirty"] == "false"
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert provenance(tmp_path, cwd=tmp_path)["git_dirty"] == "false"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance(tmp_path, cwd=tmp_path)["git_dirty"] == "true"


def test_run_name_has_commit_time_and_dvc_experiment(monkeypatch):
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert run_name("a57f6e5aa0c1", now) == "train-a57f6e5-20250102T030405Z"
    monkeypatch.setenv("DVC_EXP_NAME", "plain-gaze")  # what `dvc exp run` sets for the stages
    assert run_name("a57f6e5aa0c1", now) == "train-plain-gaze-a57f6e5-20250102T030405Z"


@pytest.mark.slow
def test_lineage_from_training_run_to_model_version_and_predict(tmp_path, monkeypatch, mlflow_server):
    """train -> evaluate -> register on a real server: dataset inputs, one provenance on the run, the
    version and the reports, the version's description; then `ssd predict` on it warns about nothing."""
    import mlflow

    name = "tinyssd-lineage-test"
    project = make_project(tmp_path / "p", epochs=1)
    (project / "data/raw/manifest.json").write_text(json.dumps({"resolved_source": "d2l", "url": URL}))
    commit = _git_project(project)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # Its own experiment: MLflow keeps one dataset per (experiment, name, digest), with the source
    # it was first logged with, and other tests train on the same tiny images.
    assert cli_main(["train", "--experiment", "tinyssd-lineage-test"]) == 0
    assert cli_main(["evaluate", "-S", "evaluate.gallery_images=1"]) == 0
    assert cli_main(["register", "-S", f"registry.model_name={name}"]) == 0

    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    run = client.get_run(read_run_file()["run_id"])
    # The UI opens the experiment on its training runs, not on MLflow 3's (empty) GenAI overview.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    hashes = dvc_md5(project / "data/raw")
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"bananas_train", "bananas_val"}
    for split, context in (("bananas_train", "training"), ("bananas_val", "validation")):
        dataset = inputs[split].dataset
        assert dataset.digest == hashes[f"banana-detection/{split}"]
        assert (dataset.source_type, json.loads(dataset.source)) == ("http", {"url": URL})
        assert {t.key: t.value for t in inputs[split].tags}["mlflow.data.context"] == context

    expected = {"git_commit": commit, "git_dirty": "false", "data_hash": f"dvc-md5:{hashes['.']}",
                "data_source": URL, "data_synthetic_fallback": "false"}
    version = client.get_model_version(name, "1")
    assert {k: run.data.tags[k] for k in PROVENANCE_KEYS} == expected
    assert {k: version.tags[k] for k in PROVENANCE_KEYS} == expected
    for report in ("train", "eval", "registration"):
        assert json.loads((project / f"reports/{report}.json").read_text())["provenance"] == expected, report

    metrics = json.loads((project / "reports/eval.json").read_text())
    for key in ("map_50", "map", "precision", "recall"):
        assert f"{key} {metrics[key]:.4f}" in version.description, key
    assert "promoted: no champion yet" in version.description

    predicted = subprocess.run([str(Path(sys.executable).with_name("ssd")), "predict",
                                "data/raw/banana-detection/bananas_val/images/0.png", "--model",
                                f"models:/{name}@champion", "--threshold", "0"],
                               cwd=project, env=train_env(mlflow_server), capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads(predicted.stdout)[0]["detections"]
    assert not [line for line in predicted.stderr.splitlines() if "warning" in line.lower()], predicted.stderr


@pytest.mark.slow
def test_resume_after_a_validation_change_keeps_lineage_and_version(tmp_path, monkeypatch, mlflow_server):
    """A second training that changed only the validation split resumed with nothing to do, yet
    registered a new version of the same weights, retagged the run with the new commit and data
    hash, and listed a second `bananas_val` input."""
    import mlflow

    from tiny_data import write_split

    name, experiment = "tinyssd-resume-lineage", "tinyssd-resume-lineage"
    project = make_project(tmp_path / "p", epochs=1)
    (project / "data/raw/manifest.json").write_text(json.dumps({"resolved_source": "d2l", "url": URL}))
    first_commit = _git_project(project)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    first_hashes = dvc_md5(project / "data/raw")
    stages = (["train", "--experiment", experiment], ["evaluate", "-S", "evaluate.gallery_images=1"],
              ["register", "-S", f"registry.model_name={name}"])
    for stage in stages:
        assert cli_main(stage) == 0, stage
    run_id = read_run_file()["run_id"]

    write_split(project / "data/raw/banana-detection/bananas_val", 4, 64, seed=7)  # another validation split
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit",
                    "-q", "--allow-empty", "-m", "later"], check=True)
    assert dvc_md5(project / "data/raw")["."] != first_hashes["."]
    for stage in stages:
        assert cli_main(stage) == 0, stage
    assert read_run_file()["run_id"] == run_id  # resumed, nothing left to train

    record = json.loads((project / "reports/registration.json").read_text())
    assert (record["version"], record["reused_version"]) == (1, True)
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    run = client.get_run(run_id)
    assert run.data.tags["git_commit"] == first_commit and first_commit[:7] in run.info.run_name
    assert run.data.tags["data_hash"] == f"dvc-md5:{first_hashes['.']}"
    digests = sorted((i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs)
    assert digests == [("bananas_train", first_hashes["banana-detection/bananas_train"]),
                       ("bananas_val", first_hashes["banana-detection/bananas_val"])]
    # The version's validation figures follow the new split; its provenance stays the run's.
    version = client.get_model_version(name, "1")
    assert version.tags["val_digest"] == "dvc-md5:" + dvc_md5(project / "data/raw/banana-detection/bananas_val")["."]
    assert version.tags["git_commit"] == first_commit
