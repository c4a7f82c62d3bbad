"""Serving: the registered champion, loaded by URI and behind `mlflow models serve`, answers with detections."""
import base64
import io
import json
import os
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from ssd.core.model import TinySSD, save_model
from ssd.engine.prediction import predict_files
from ssd.mlops.models import load_detector
from ssd.mlops.pyfunc import OUTPUT_COLUMNS
from ssd.stages.register import register
from ssd.util.params import load_settings

from servers import free_port, http_server
from tiny_data import write_dataset
from ssd.mlops.tracking import write_run_file

ROOT = Path(__file__).resolve().parents[2]
NAME = "tinyssd-serve-test"
URI = f"models:/{NAME}@champion"

pytestmark = pytest.mark.slow


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def champion(mlflow_server, tmp_path_factory):
    """A champion registered the way `ssd register` does it, on the test server."""
    import mlflow

    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_model(TinySSD(1), tmp / "model.pt")
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run() as run:
        pass
    write_run_file(run.info.run_id, mlflow_server, tmp / "mlflow_run.json")
    (tmp / "eval.json").write_text(json.dumps({"map_50": 0.4}))
    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", f"registry.model_name={NAME}"])
    data = write_dataset(tmp / "data", train=1, val=2, size=64)  # register tags the validation split's digest
    record = register(settings, tmp / "model.pt", tmp / "eval.json", tmp / "mlflow_run.json",
                      tmp / "registration.json", data)
    assert "champion" in record["aliases"]
    return tmp


def test_champion_loads_by_alias_and_predicts(champion, mlflow_server, monkeypatch):
    import mlflow

    model = mlflow.pyfunc.load_model(URI)
    frame = pd.DataFrame({"image": [base64.b64encode(_png(Image.new("LA", (90, 40)))).decode()]})
    table = model.predict(frame, params={"threshold": 0.0})
    assert list(table.columns) == OUTPUT_COLUMNS and len(table) > 0
    assert (table["xmax"] <= 90).all() and (table["ymax"] <= 40).all()
    version = str(json.loads((champion / "registration.json").read_text())["version"])
    assert set(table["model_name"]) == {NAME} and set(table["model_version"]) == {version}  # what @champion named

    # `ssd predict --model models:/...@champion` goes through the same model.
    Image.new("RGB", (120, 60), (200, 180, 20)).save(champion / "img.png")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (result,) = predict_files([champion / "img.png"], load_detector(URI), threshold=0.0)
    assert (result["width"], result["height"]) == (120, 60) and result["detections"]
    assert (result["model"]["name"], str(result["model"]["version"]), result["model"]["alias"]) == (NAME, version,
                                                                                                 "champion")


def test_mlflow_models_serve_answers_rest_requests(champion, mlflow_server):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", URI,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    base = f"http://127.0.0.1:{port}"
    # A stateless scoring server: no need to wait long for a graceful stop.
    with http_server(command, base + "/ping", champion / "serve.log", env=env, timeout=180, stop_timeout=5):
        images = [_png(Image.new("RGBA", (100, 80), (200, 100, 50, 128))), _png(Image.new("L", (300, 200), 90))]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]},
                "params": {"threshold": 0.0}}
        request = urllib.request.Request(base + "/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        assert {p["image"] for p in predictions} == {0, 1}
        assert set(predictions[0]) == set(OUTPUT_COLUMNS)
        version = str(json.loads((champion / "registration.json").read_text())["version"])
        assert {(p["model_name"], p["model_version"]) for p in predictions} == {(NAME, version)}
        for p in predictions:
            width, height = (100, 80) if p["image"] == 0 else (300, 200)
            assert 0 <= p["xmin"] <= p["xmax"] <= width and 0 <= p["ymin"] <= p["ymax"] <= height
