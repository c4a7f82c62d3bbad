"""Models for consumers: `ssd predict` from any folder with the model's own settings, a registry model
loaded as weights and settings (its stored code never runs), outputs that name the model, and the
ONNX export. Every `ssd` here is a real process started outside the checkout, with no params file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from ssd.core.model import TinySSD, read_model, save_model
from ssd.mlops.models import pyfunc_parts
from ssd.stages import model_params
from tiny_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]


def ssd(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``ssd ARGS`` run in ``cwd`` with this checkout's package (not whatever is installed)."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "ssd", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=environ)


def trained_at(path: Path, image_size: int, classes=("banana",), seed: int = 0) -> Path:
    """A model file as training writes one: the params it was trained with inside."""
    torch.manual_seed(seed)
    net = TinySSD(len(classes), classes=list(classes), image_size=image_size)
    save_model(net, path, params={"data": {"image_size": image_size, "classes": list(classes)}},
               mlflow_run_id="0123456789abcdef")
    return path


@pytest.fixture
def outside(tmp_path):
    """A folder outside any checkout with one image and no params.yaml."""
    folder = tmp_path / "consumer"
    folder.mkdir()
    Image.new("RGB", (120, 60), (200, 180, 20)).save(folder / "img.png")
    return folder


def test_fallbacks_are_params_yaml_values():
    """Outside a checkout `ssd predict` uses these; they must be what params.yaml says."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in model_params.FALLBACKS.items():
        section, leaf = key.split(".")
        assert params[section][leaf] == value, key


def test_predict_a_model_file_outside_the_checkout_with_its_own_image_size(outside):
    model = trained_at(outside / "model.pt", 128)
    result = ssd("predict", "img.png", "--model", "model.pt", "--threshold", "0", "--out", "pictures", cwd=outside)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["detections"] and record["model"] == {
        "uri": "model.pt", "name": None, "version": None, "alias": None, "run_id": "0123456789abcdef",
        "classes": ["banana"], "image_size": 128, "nms_threshold": 0.5, "nms": "agnostic"}
    with Image.open(outside / "pictures" / "img.png") as picture:
        assert json.loads(picture.text["ssd:model"]) == record["model"]
    assert read_model(model).image_size == 128


def test_a_param_that_contradicts_the_model_is_refused_in_one_line(outside):
    trained_at(outside / "model.pt", 128)
    result = ssd("predict", "img.png", "--model", "model.pt", "-S", "data.image_size=256", cwd=outside)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "ssd predict: error: -S data.image_size=256: data.image_size=256 contradicts the model: model.pt has "
        "data.image_size=128 (drop the param, or use another model)"]


def test_the_checkouts_params_yaml_does_not_override_the_model(outside):
    """params.yaml says 256 (not named on the command line): the model's 128 is used, with a note."""
    (outside / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    trained_at(outside / "model.pt", 128)
    result = ssd("predict", "img.png", "--model", "model.pt", cwd=outside)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["model"]["image_size"] == 128
    assert "note: data.image_size=128 from the model (model.pt), not params.yaml's 256" in result.stderr


def test_evaluate_scores_a_model_at_the_image_size_it_was_trained_at(tmp_path):
    """`ssd evaluate --model` of a 128-px model in a checkout whose params.yaml says 256 scores at 128
    (the same figures as when 128 is given), and an explicit 256 is refused."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    data = write_dataset(tmp_path / "data", train=1, val=4, size=64)
    trained_at(tmp_path / "model.pt", 128)
    common = ["--model", "model.pt", "--data", str(data), "--run-file", "none", "-S", "evaluate.gallery_images=1"]

    implicit = ssd("evaluate", *common, "--reports", "implicit", cwd=tmp_path)
    assert implicit.returncode == 0, implicit.stderr
    assert "data.image_size=128 from the model (model.pt), not params.yaml's 256" in implicit.stderr
    stated = ssd("evaluate", *common, "-S", "data.image_size=128", "--reports", "stated", cwd=tmp_path)
    assert stated.returncode == 0, stated.stderr
    scores = [json.loads((tmp_path / r / "eval.json").read_text()) for r in ("implicit", "stated")]
    assert scores[0]["bbox_mae"] == scores[1]["bbox_mae"] and scores[0]["map_50"] == scores[1]["map_50"]

    refused = ssd("evaluate", *common, "-S", "data.image_size=256", "--reports", "refused", cwd=tmp_path)
    assert refused.returncode == 1 and not (tmp_path / "refused").exists()
    assert "-S data.image_size=256: data.image_size=256 contradicts the model" in refused.stderr


def test_a_file_that_is_not_a_tinyssd_is_refused_in_one_line(outside):
    torch.manual_seed(0)
    wrong = TinySSD(2).state_dict()
    torch.save({"config": {"num_classes": 1}, "model": wrong}, outside / "shapes.pt")
    torch.save({"config": {"num_classes": 1}, "model": {"fc.weight": torch.zeros(2)}}, outside / "keys.pt")
    torch.save([1, 2, 3], outside / "list.pt")
    for name in ("shapes.pt", "keys.pt", "list.pt"):
        result = ssd("predict", "img.png", "--model", name, cwd=outside)
        assert result.returncode == 1, name
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"ssd predict: error: {name} is not a TinySSD model file"), line


@pytest.mark.parametrize("mlmodel, message", [
    ({"flavors": {"python_function": {"config": {"image_size": 64}}}}, "names no 'weights' artifact"),
    ({"flavors": {"python_function": {"artifacts": {"weights": {"path": "../../x/model.pt"}},
                                      "config": {"image_size": 64}}}}, "outside the model: refused"),
    ({"flavors": {"python_function": {"artifacts": {"weights": {"path": "/etc/passwd"}},
                                      "config": {"image_size": 64}}}}, "outside the model: refused"),
    ({"flavors": {"python_function": {"artifacts": {"weights": {"path": "artifacts/model.pt"}}}}},
     "has no model config"),
    ({"flavors": {"sklearn": {}}}, "names no 'weights' artifact"),
])
def test_an_mlmodel_that_is_not_ssds_pyfunc_is_refused(mlmodel, message):
    with pytest.raises(ValueError, match=message):
        pyfunc_parts(yaml.safe_dump(mlmodel), "models:/x/1")


def test_export_onnx_runs_on_onnxruntime_with_pytorchs_detections(outside):
    from ssd.engine.inference import detect_raw
    from ssd.engine.onnx_export import run_onnx, sample_images

    trained_at(outside / "model.pt", 64, classes=("banana", "apple", "pear"))
    result = ssd("export", "--model", "model.pt", "--out", "model.onnx", "-S", "evaluate.nms=per_class", cwd=outside)
    assert result.returncode == 0, result.stderr
    meta = json.loads(result.stdout)
    assert json.loads(meta["ssd.classes"]) == ["banana", "apple", "pear"] and meta["ssd.image_size"] == "64"
    assert meta["ssd.nms"] == "per_class" and json.loads(meta["ssd.model"])["uri"] == "model.pt"

    import onnx

    stored = {p.key: p.value for p in onnx.load(str(outside / "model.onnx")).metadata_props}
    assert stored == {k: v for k, v in meta.items() if k.startswith("ssd.")}
    net = read_model(outside / "model.pt").net
    images = sample_images(6, 64, seed=1)
    ours = detect_raw(net, images, 0.5, per_class=True)
    theirs = run_onnx(outside / "model.onnx", images)
    for a, b in zip(ours, theirs):  # every row NMS kept, whatever its score
        assert a.shape == b.shape and len(a) > 0
        assert torch.equal(a[:, 0], b[:, 0]) and torch.allclose(a[:, 1:], b[:, 1:], atol=1e-4)


HOSTILE = '''import pathlib
pathlib.Path({marker!r}).write_text("code stored in the registry ran")
import mlflow.models
from ssd.mlops.pyfunc import TinySSDModel
mlflow.models.set_model(TinySSDModel())
'''


def register_pyfunc(server: str, name: str, code: Path, artifacts: dict, config: dict) -> int:
    """Log a pyfunc from ``code`` with ``artifacts`` and ``config`` and make it ``name``'s champion."""
    import mlflow

    mlflow.set_tracking_uri(server)
    mlflow.set_registry_uri(server)  # another test may have pointed the registry elsewhere
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts=artifacts,
                                       model_config=config, pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, name).version
    mlflow.MlflowClient(server).set_registered_model_alias(name, "champion", version)
    return int(version)


@pytest.fixture
def hostile(mlflow_server, tmp_path):
    """A champion whose stored pyfunc code writes a marker file when it is imported, with real weights."""
    marker = tmp_path / "marker"
    code = tmp_path / "hostile.py"
    code.write_text(HOSTILE.format(marker=str(marker)))
    weights = trained_at(tmp_path / "model.pt", 64)
    config = {"image_size": 64, "threshold": 0.9, "nms_threshold": 0.5, "max_image_pixels": 10**6}
    version = register_pyfunc(mlflow_server, "tinyssd-hostile", code, {"weights": str(weights)}, config)
    marker.unlink(missing_ok=True)  # whatever logging did; from here on only a load may write it
    return marker, version


def test_predict_never_runs_the_code_stored_with_a_registry_model(hostile, mlflow_server, outside):
    marker, version = hostile
    for uri in ("models:/tinyssd-hostile@champion", f"models:/tinyssd-hostile/{version}"):
        result = ssd("predict", "img.png", "--model", uri, "--threshold", "0", cwd=outside,
                     MLFLOW_TRACKING_URI=mlflow_server)
        assert result.returncode == 0, result.stderr
        (record,) = json.loads(result.stdout)
        assert record["detections"]
        model = record["model"]
        assert (model["name"], model["version"], model["uri"]) == ("tinyssd-hostile", version, uri)
        assert model["alias"] == ("champion" if "@" in uri else None) and model["run_id"]
        assert (model["image_size"], model["classes"]) == (64, ["banana"])
        assert not marker.exists(), f"{uri}: the registry's code ran"
    # The same model loaded as a pyfunc does run it: the check above could fail.
    import mlflow

    mlflow.pyfunc.load_model("models:/tinyssd-hostile@champion")
    assert marker.exists()


def test_a_registry_model_without_tinyssd_weights_is_refused_in_one_line(mlflow_server, outside, tmp_path):
    marker = tmp_path / "marker"
    code = tmp_path / "hostile.py"
    code.write_text(HOSTILE.format(marker=str(marker)))
    junk = tmp_path / "junk.pt"
    torch.save({"config": {"num_classes": 1}, "model": {"layer.weight": torch.zeros(3)}}, junk)
    config = {"image_size": 64, "nms_threshold": 0.5, "threshold": 0.9}
    register_pyfunc(mlflow_server, "tinyssd-junk", code, {"weights": str(junk)}, config)
    register_pyfunc(mlflow_server, "tinyssd-noweights", code, {"other": str(junk)}, config)
    marker.unlink(missing_ok=True)
    for name, message in (("tinyssd-junk", "models:/tinyssd-junk@champion (its artifacts/junk.pt) is not a "
                                           "TinySSD model file"),
                          ("tinyssd-noweights", "models:/tinyssd-noweights@champion is not a TinySSD model: its "
                                                "MLmodel names no 'weights' artifact")):
        result = ssd("predict", "img.png", "--model", f"models:/{name}@champion", cwd=outside,
                     MLFLOW_TRACKING_URI=mlflow_server)
        assert result.returncode == 1 and result.stdout == ""
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"ssd predict: error: {message}"), line
    assert not marker.exists()


def test_predict_the_default_champion_and_a_runs_uri_outside_the_checkout(hostile, mlflow_server, outside):
    """No --model: models:/<registry.model_name>@champion, where the name is params.yaml's own default."""
    marker, version = hostile
    default = ssd("predict", "img.png", cwd=outside, MLFLOW_TRACKING_URI=mlflow_server)
    if default.returncode == 0:  # another test on this server registered a `tinyssd` champion
        assert json.loads(default.stdout)[0]["model"]["uri"] == "models:/tinyssd@champion"
    else:
        assert default.stderr.strip().startswith("ssd predict: error: no model models:/tinyssd@champion at ")
    run_id = json.loads(ssd("predict", "img.png", "--model", "models:/tinyssd-hostile@champion", cwd=outside,
                            MLFLOW_TRACKING_URI=mlflow_server).stdout)[0]["model"]["run_id"]
    result = ssd("predict", "img.png", "--model", f"runs:/{run_id}/model", "-S", "registry.model_name=x",
                 cwd=outside, MLFLOW_TRACKING_URI=mlflow_server)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["model"]["run_id"] == run_id
    assert not marker.exists()
