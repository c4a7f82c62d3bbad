"""A model of the ``photos`` recipe carries its detection settings: evaluate and predict follow them, and
evaluate chooses its display threshold on the precision-recall curve (best F1), saying so in eval.json."""
import csv
import json
from pathlib import Path

import pytest
import torch

from ssd.cli import main as cli_main
from ssd.core.model import TinySSD, read_model, save_model
from ssd.engine.metrics import best_f1
from ssd.mlops.models import file_settings

ROOT = Path(__file__).resolve().parents[2]


def test_best_f1_by_hand_and_ties_go_to_the_higher_threshold():
    curve = [{"threshold": 0.1, "precision": 0.2, "recall": 1.0},   # F1 1/3
             {"threshold": 0.5, "precision": 0.5, "recall": 0.5},   # F1 1/2
             {"threshold": 0.6, "precision": 1.0, "recall": 1 / 3},  # F1 1/2: the tie's higher threshold
             {"threshold": 0.9, "precision": 0.0, "recall": 0.0}]
    assert best_f1(curve) == pytest.approx({"threshold": 0.6, "precision": 1.0, "recall": 1 / 3, "f1": 0.5})
    assert best_f1(curve[3:])["threshold"] == 0.9  # nothing right anywhere: show nothing
    with pytest.raises(ValueError, match="empty"):
        best_f1([])


@pytest.fixture(scope="module")
def photos_model(tmp_path_factory):
    from tests.engine.test_evaluate import make_split

    tmp = tmp_path_factory.mktemp("photos")
    make_split(tmp / "data" / "bananas_val", 6)
    torch.manual_seed(0)
    net = TinySSD(1, sizes=[[0.3, 0.4]] * 5, ratios=[1.0, 0.5, 2.0], fusion=True, image_size=64)
    save_model(net, tmp / "photos.pt", params={"data": {"image_size": 64}, "train": {"recipe": "photos"}})
    save_model(net, tmp / "book.pt", params={"data": {"image_size": 64}, "train": {"recipe": "book"}})
    return tmp


def test_the_model_file_says_how_to_detect_with_it(photos_model):
    photos = file_settings(read_model(photos_model / "photos.pt"))
    assert photos["evaluate.nms"] == "per_class" and 0 < photos["evaluate.nms_threshold"] < 1
    assert read_model(photos_model / "photos.pt").net.config.fusion
    book = file_settings(read_model(photos_model / "book.pt"))
    assert book == {"data.classes": ["banana"], "data.image_size": 64}  # the params decide, as before recipes


@pytest.fixture(autouse=True)
def checkout(tmp_path, monkeypatch):
    """Run as in a checkout: ./params.yaml (evaluate.nms: agnostic) is there but not named."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)


def evaluate(photos_model, reports, *extra):
    return cli_main(["evaluate", "-S", "evaluate.gallery_images=2", *extra,
                     "--model", str(photos_model / "photos.pt"), "--data", str(photos_model / "data"),
                     "--reports", str(reports), "--run-file", str(reports / "absent.json")])


def test_evaluate_picks_the_threshold_of_best_f1_and_states_it(photos_model, tmp_path):
    assert evaluate(photos_model, tmp_path / "r") == 0
    saved = json.loads((tmp_path / "r" / "eval.json").read_text())
    with open(tmp_path / "r" / "pr_curve.csv") as f:
        curve = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    best = best_f1(curve)
    assert saved["threshold"] == best["threshold"]
    assert (saved["precision"], saved["recall"]) == pytest.approx((best["precision"], best["recall"]))
    assert "best F1" in saved["threshold_from"]


def test_an_explicit_threshold_wins_and_a_contradicting_nms_is_refused(photos_model, tmp_path, capsys):
    assert evaluate(photos_model, tmp_path / "r", "-S", "evaluate.threshold=0.3") == 0
    saved = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert saved["threshold"] == 0.3 and "threshold_from" not in saved
    assert evaluate(photos_model, tmp_path / "r2", "-S", "evaluate.nms=agnostic") == 1
    assert "evaluate.nms='agnostic' contradicts the model" in capsys.readouterr().err


def test_predict_detects_with_the_model_settings(photos_model, capsys):
    image = photos_model / "data" / "bananas_val" / "images" / "0.png"
    rc = cli_main(["predict", str(image), "--model", str(photos_model / "photos.pt")])
    assert rc == 0
    captured = capsys.readouterr()
    (record,) = json.loads(captured.out)
    assert record["model"]["nms"] == "per_class" and record["model"]["image_size"] == 64
    assert "evaluate.nms='per_class' from the model" in captured.err  # params.yaml says agnostic: noted
    scores = [d["score"] for d in record["detections"]]
    assert scores and min(scores) >= 0.4 > max(scores) - 0.5  # the recipe's display threshold, not params' 0.9


@pytest.mark.slow
def test_export_writes_the_fused_net_with_its_nms_and_onnx_gives_its_detections(photos_model, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    rc = cli_main(["export", "--model", str(photos_model / "photos.pt"), "--out", str(tmp_path / "m.onnx")])
    assert rc == 0  # the stage compares the graph's detections with PyTorch's before it writes the file
    meta = json.loads(capsys.readouterr().out)
    assert meta["ssd.nms"] == "per_class" and meta["ssd.image_size"] == "64" and (tmp_path / "m.onnx").is_file()


@pytest.mark.slow  # a registration: pyfunc, load check and ONNX export, in a SQLite store
def test_register_gives_the_version_the_recipe_nms_and_the_threshold_evaluate_chose(photos_model, tmp_path):
    import mlflow

    from ssd.mlops.models import open_model
    from ssd.mlops.provenance import PROVENANCE_KEYS
    from ssd.mlops.tracking import write_run_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(tags={key: key for key in PROVENANCE_KEYS}) as run:  # as training tags it
        pass
    write_run_file(run.info.run_id, uri, tmp_path / "mlflow_run.json")
    assert evaluate(photos_model, tmp_path / "r") == 0
    chosen = json.loads((tmp_path / "r" / "eval.json").read_text())["threshold"]
    assert chosen != 0.9  # not params.yaml's, or the test could not tell
    rc = cli_main(["register", "-S", "registry.model_name=tinyssd-photos", "--model", str(photos_model / "photos.pt"),
                   "--eval", str(tmp_path / "r" / "eval.json"), "--run-file", str(tmp_path / "mlflow_run.json"),
                   "--out", str(tmp_path / "registration.json"), "--data", str(photos_model / "data")])
    assert rc == 0
    settings = open_model("models:/tinyssd-photos/1", device="cpu").settings
    assert settings["evaluate.threshold"] == chosen and settings["evaluate.nms"] == "per_class"
