"""Model registry: the promotion rule, and registration/promotion against a real `mlflow server`,
directly and behind a real HTTP proxy that answers 500 where a test says."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssd.cli import main as cli_main
from ssd.core.model import TinySSD, save_model
from ssd.mlops.provenance import PROVENANCE_KEYS
from ssd.mlops.registry import decide_promotion
from ssd.mlops.tracking import write_run_file
from ssd.stages.register import register
from ssd.util.params import load_settings
from servers import FaultyProxy, dead_port
from tiny_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]
NAME = "tinyssd-registry-test"


class TestDecidePromotion:
    def test_no_champion_promotes(self):
        assert decide_promotion(0.1, None).promote

    def test_better_promotes(self):
        d = decide_promotion(0.7, 0.5, 0.0)
        assert d.promote and d.label == "promoted" and "beats" in d.reason

    def test_equal_does_not_promote(self):
        assert not decide_promotion(0.5, 0.5, 0.0).promote

    def test_worse_does_not_promote(self):
        d = decide_promotion(0.3, 0.5, 0.0)
        assert not d.promote and d.label == "kept"

    def test_min_improvement(self):
        assert not decide_promotion(0.55, 0.5, 0.1).promote
        assert decide_promotion(0.61, 0.5, 0.1).promote

    def test_nan_candidate_never_promotes(self):
        assert not decide_promotion(float("nan"), None).promote

    def test_champion_with_unknown_metric_is_kept(self):
        assert not decide_promotion(0.9, None, 0.0, has_champion=True).promote


def _training_run(tmp: Path, uri: str, seed: int, map_50: float) -> dict:
    """What the train and evaluate stages leave behind: model.pt, the run file and eval.json."""
    import mlflow

    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_model(TinySSD(1), tmp / "model.pt")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(tags={key: f"{key}-{seed}" for key in PROVENANCE_KEYS}) as run:  # as training tags it
        pass
    write_run_file(run.info.run_id, uri, tmp / "mlflow_run.json")
    (tmp / "eval.json").write_text(json.dumps({"map_50": map_50, "map": map_50 / 2, "precision": 0.5}))
    return {"model_path": tmp / "model.pt", "eval_file": tmp / "eval.json", "run_file": tmp / "mlflow_run.json",
            "out": tmp / "registration.json",
            # The same small validation split every time: stored figures stay comparable (no re-scoring).
            "data_dir": write_dataset(tmp / "raw", train=1, val=2, size=64)}


@pytest.mark.slow
def test_register_and_promote_against_mlflow_server(mlflow_server, tmp_path, monkeypatch, capsys):
    import mlflow

    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", f"registry.model_name={NAME}"])
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)

    first = _training_run(tmp_path / "a", mlflow_server, seed=0, map_50=0.5)
    rec = register(settings, **first)
    assert (rec["version"], rec["decision"], rec["aliases"]) == (1, "promoted", ["challenger", "champion"])
    assert json.loads(first["out"].read_text()) == rec
    version = client.get_model_version(NAME, "1")
    assert version.tags["val_map_50"] == "0.5" and {"model_sha256", "run_id"} <= set(version.tags)
    # The version's provenance is its training run's, in its tags and in the record.
    provenance = {key: f"{key}-0" for key in PROVENANCE_KEYS}
    assert {key: version.tags[key] for key in PROVENANCE_KEYS} == rec["provenance"] == provenance
    assert version.description == ("**Validation** (reports/eval.json): map_50 0.5000, map 0.2500, precision 0.5000"
                                   "\n\n**Champion decision**: promoted: no champion yet: candidate map_50=0.5000 "
                                   "becomes champion")

    # Safe to run twice: same run, same weights -> the same version, nothing new registered; a
    # re-evaluation updates its metric tags.
    first["eval_file"].write_text(json.dumps({"map_50": 0.5, "map": 0.2}))
    again = register(settings, **first)
    assert (again["version"], again["reused_version"], again["aliases"]) == (1, True, ["challenger", "champion"])
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    assert client.get_model_version(NAME, "1").tags["val_map"] == "0.2"

    worse = register(settings, **_training_run(tmp_path / "b", mlflow_server, seed=1, map_50=0.3))
    assert (worse["version"], worse["decision"], worse["aliases"]) == (2, "kept", ["challenger"])
    assert "**Champion decision**: kept: map_50 0.3000 does not beat" in client.get_model_version(NAME, "2").description
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"

    better = register(settings, **_training_run(tmp_path / "c", mlflow_server, seed=2, map_50=0.7))
    assert (better["version"], better["decision"], better["champion_version"]) == (3, "promoted", 3)
    assert client.get_model_version(NAME, "2").aliases == []  # challenger moved on

    # Manual promotion, as a person would do in the UI, through the CLI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    capsys.readouterr()
    assert cli_main(["promote", "--version", "2", "--params", str(ROOT / "params.yaml"),
                     "-S", f"registry.model_name={NAME}"]) == 0
    assert json.loads(capsys.readouterr().out)["previous_champion"] == 3
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"

    assert cli_main(["promote", "--version", "99", "--name", NAME, "--params", str(ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "no version 99" in err and "versions: 1, 2, 3" in err
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"


def test_register_without_eval_file_is_a_clear_error(tmp_path, capsys):
    save_model(TinySSD(1), tmp_path / "model.pt")
    rc = cli_main(["register", "--params", str(ROOT / "params.yaml"), "--model", str(tmp_path / "model.pt"),
                   "--eval", str(tmp_path / "eval.json"), "--out", str(tmp_path / "registration.json")])
    assert rc == 1
    assert "eval.json not found" in capsys.readouterr().err
    assert not (tmp_path / "registration.json").exists()


# ----------------------------------------------------------------------------------------------
# Faults: every failure other than "does not exist" stops `ssd register` with nothing moved.

def _register_cli(run: dict, name: str, uri: str | None = None) -> int:
    """``ssd register`` (through ``ssd.cli.main``) for a run made by ``_training_run``; ``uri``: the
    tracking server its run file names (e.g. a proxy in front of the real one)."""
    if uri is not None:
        info = json.loads(run["run_file"].read_text())
        write_run_file(info["run_id"], uri, run["run_file"])
    return cli_main(["register", "--params", str(ROOT / "params.yaml"), "-S", "data.image_size=64",
                     "-S", f"registry.model_name={name}", "--model", str(run["model_path"]), "--eval",
                     str(run["eval_file"]), "--run-file", str(run["run_file"]), "--out", str(run["out"]),
                     "--data", str(run["data_dir"])])


def _state(client, name: str) -> tuple[list[tuple[str, list[str]]], str | None]:
    """Every version of ``name`` with its aliases, and the champion's version."""
    versions = sorted((v.version, sorted(client.get_model_version(name, v.version).aliases))
                      for v in client.search_model_versions(f"name='{name}'"))
    champion = [v for v, aliases in versions if "champion" in aliases]
    return versions, champion[0] if champion else None


def _with_champion(tmp_path: Path, server: str, name: str) -> tuple[object, dict]:
    """``name`` with version 1 (val map_50 0.26) as champion and challenger."""
    import mlflow

    good = _training_run(tmp_path / "good", server, seed=0, map_50=0.26)
    assert _register_cli(good, name) == 0
    client = mlflow.MlflowClient(server, server)
    assert _state(client, name) == ([("1", ["challenger", "champion"])], "1")
    return client, good


@pytest.mark.slow
def test_failing_champion_lookup_moves_nothing(mlflow_server, tmp_path, capsys):
    """A 500 on the alias lookup once read as "no champion" crowned a far worse model (0.01)."""
    name = "tinyssd-fault-alias"
    client, _ = _with_champion(tmp_path, mlflow_server, name)
    worse = _training_run(tmp_path / "worse", mlflow_server, seed=1, map_50=0.01)
    with FaultyProxy(mlflow_server, fail=("registered-models/alias",)) as proxy:
        assert _register_cli(worse, name, proxy.uri) == 75
    assert proxy.failed() and all("registered-models/alias" in path for _, path, _ in proxy.failed())
    assert "transient error" in capsys.readouterr().err
    assert _state(client, name) == ([("1", ["challenger", "champion"])], "1")  # nothing registered or moved
    assert not worse["out"].exists()


@pytest.mark.slow
def test_failing_version_search_registers_no_duplicate(mlflow_server, tmp_path):
    """A 500 on the version search once read as "not registered yet" registered a duplicate."""
    name = "tinyssd-fault-search"
    client, good = _with_champion(tmp_path, mlflow_server, name)
    good["out"].unlink()
    with FaultyProxy(mlflow_server, fail=("model-versions/search",)) as proxy:
        assert _register_cli(good, name, proxy.uri) == 75  # the same run and weights again
    assert [path for _, path, _ in proxy.failed()] and not good["out"].exists()
    assert _state(client, name) == ([("1", ["challenger", "champion"])], "1")


def test_unreachable_server_fails_in_seconds(tmp_path):
    """A real `ssd register` process against a port where nothing listens: exit 75 at once (it
    hung for minutes in MLflow's own HTTP retries)."""
    save_model(TinySSD(1), tmp_path / "model.pt")
    (tmp_path / "eval.json").write_text(json.dumps({"map_50": 0.5}))
    write_run_file("0" * 32, f"http://127.0.0.1:{dead_port()}", tmp_path / "mlflow_run.json")
    run = {"model_path": tmp_path / "model.pt", "eval_file": tmp_path / "eval.json", "out": tmp_path / "out.json",
           "run_file": tmp_path / "mlflow_run.json", "data_dir": write_dataset(tmp_path / "raw", train=1, val=2, size=64)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "ssd", "register", "--params", str(ROOT / "params.yaml"),
                             "--model", str(run["model_path"]), "--eval", str(run["eval_file"]), "--run-file",
                             str(run["run_file"]), "--out", str(run["out"]), "--data", str(run["data_dir"])],
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 75, result.stderr[-2000:]
    # Checked before MLflow is imported; MLflow's own retries took minutes. The bound leaves room for
    # the interpreter and torch to start on a loaded machine (10.7 s seen at a load of 6 on 2 cores).
    assert "is unreachable" in result.stderr and elapsed < 30, elapsed
    assert not run["out"].exists()


@pytest.mark.slow
def test_model_that_does_not_load_is_registered_but_never_champion(mlflow_server, tmp_path, capsys):
    import mlflow

    name = "tinyssd-fault-load"
    broken = _training_run(tmp_path / "broken", mlflow_server, seed=0, map_50=0.9)
    broken["model_path"].write_bytes(b"not a TinySSD model file")  # registered as it is; fails to load
    assert _register_cli(broken, name) == 1
    assert "does not load and predict" in capsys.readouterr().err
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    assert _state(client, name) == ([("1", [])], None)  # no champion even with none before: no alias at all
    assert client.get_model_version(name, "1").tags["load_check"].startswith("failed: ")
    assert not broken["out"].exists()


@pytest.mark.slow
def test_an_onnx_file_that_cannot_be_logged_moves_no_alias(mlflow_server, tmp_path, capsys):
    """The ONNX file is logged after the load check and before any alias moves: when the run's
    artifact folder cannot take it (a file where its folder goes), the version stays without
    aliases; once it can, the same command logs it and moves them."""
    import mlflow

    name = "tinyssd-fault-onnx"
    run = _training_run(tmp_path / "run", mlflow_server, seed=0, map_50=0.5)
    run_id = json.loads(run["run_file"].read_text())["run_id"]
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))  # the server's local store
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "onnx").write_text("in the way")
    assert _register_cli(run, name) == 1
    assert f"cannot log the ONNX file of models:/{name}/1 into run {run_id}" in capsys.readouterr().err
    assert _state(client, name) == ([("1", [])], None) and not run["out"].exists()
    tags = client.get_model_version(name, "1").tags
    assert tags["load_check"] == "passed" and "onnx" not in tags

    (artifacts / "onnx").unlink()
    assert _register_cli(run, name) == 0
    assert _state(client, name) == ([("1", ["challenger", "champion"])], "1")
    assert client.get_model_version(name, "1").tags["onnx"] == f"runs:/{run_id}/onnx/{name}/1/model.onnx"
    assert json.loads(run["out"].read_text())["onnx"] == f"runs:/{run_id}/onnx/{name}/1/model.onnx"
