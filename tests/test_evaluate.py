"""Evaluation: COCO mAP through torchmetrics on hand-made cases, matching, and the whole stage."""
import csv
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from ssd.cli import main as cli_main
from ssd.evaluate import detection_metrics, evaluate, match_detections, precision_recall
from ssd.model import TinySSD, save_model
from ssd.params import load_params
from ssd.tracking import PROVENANCE_KEYS, write_run_file

ROOT = Path(__file__).resolve().parents[1]

# Two images, one banana each (pixel boxes).
TRUTH = [torch.tensor([[0, 10, 10, 50, 50.]]), torch.tensor([[0, 100, 100, 150, 160.]])]


def det(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


PERFECT = [det([0, 0.95, 10, 10, 50, 50]), det([0, 0.93, 100, 100, 150, 160])]


class TestDetectionMetrics:
    def test_perfect(self):
        m = detection_metrics(PERFECT, TRUTH, 0.9)
        assert m == pytest.approx({"map_50": 1.0, "map": 1.0, "precision": 1.0, "recall": 1.0})

    def test_shifted_below_iou_half(self):
        # IoU of each shifted box with its truth is under 0.5 (0.22 and 0.28).
        shifted = [det([0, 0.95, 30, 30, 70, 70]), det([0, 0.93, 125, 130, 175, 190])]
        m = detection_metrics(shifted, TRUTH, 0.9)
        assert m == pytest.approx({"map_50": 0.0, "map": 0.0, "precision": 0.0, "recall": 0.0})

    def test_missing_detection(self):
        # Recall reaches 0.5 at precision 1: COCO's 101-point AP is 51/101.
        m = detection_metrics([PERFECT[0], det()], TRUTH, 0.9)
        assert m["map_50"] == pytest.approx(51 / 101, abs=1e-6)
        assert m["map"] == pytest.approx(51 / 101, abs=1e-6)
        assert (m["precision"], m["recall"]) == pytest.approx((1.0, 0.5))

    def test_duplicate_ranked_between_true_positives(self):
        # TP (0.95), duplicate FP (0.94), TP (0.93): precision 2/3 at recall 1 -> AP = (51 + 50 * 2/3) / 101.
        dup = [det([0, 0.95, 10, 10, 50, 50], [0, 0.94, 11, 10, 50, 50]), PERFECT[1]]
        m = detection_metrics(dup, TRUTH, 0.9)
        assert m["map_50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)
        assert (m["precision"], m["recall"]) == pytest.approx((2 / 3, 1.0))

    def test_low_scoring_duplicate_does_not_lower_ap_but_counts_below_threshold(self):
        dup = [det([0, 0.95, 10, 10, 50, 50], [0, 0.3, 11, 10, 50, 50]), PERFECT[1]]
        assert detection_metrics(dup, TRUTH, 0.9)["map_50"] == pytest.approx(1.0)
        assert detection_metrics(dup, TRUTH, 0.2)["precision"] == pytest.approx(2 / 3)

    def test_no_detections(self):
        m = detection_metrics([det(), det()], TRUTH, 0.9)
        assert m == pytest.approx({"map_50": 0.0, "map": 0.0, "precision": 0.0, "recall": 0.0})

    def test_map_between_half_and_095(self):
        # IoU 1600 / 2080 = 0.77: a hit at the IoU thresholds .50, .55, ..., .75 (6 of COCO's 10).
        pred = [det([0, 0.9, 10, 10, 50, 62])]
        m = detection_metrics(pred, TRUTH[:1], 0.5)
        assert m["map_50"] == pytest.approx(1.0)
        assert m["map"] == pytest.approx(6 / 10)


class TestMatching:
    def test_other_class_never_matches(self):
        tp = match_detections(det([1, 0.9, 10, 10, 50, 50]), TRUTH[0])
        assert tp.tolist() == [False]

    def test_each_truth_matched_once_best_score_first(self):
        tp = match_detections(det([0, 0.5, 10, 10, 50, 50], [0, 0.8, 12, 12, 50, 50]), TRUTH[0])
        assert tp.tolist() == [False, True]

    def test_padding_rows_ignored(self):
        truth = torch.tensor([[0, 10, 10, 50, 50.], [-1, -1, -1, -1, -1]])
        assert match_detections(det([0, 0.9, 10, 10, 50, 50]), truth).tolist() == [True]
        assert precision_recall([det()], [truth], [0.5]) == [{"threshold": 0.5, "precision": 0.0, "recall": 0.0}]


def make_split(folder: Path, n: int, size: int = 64, seed: int = 0) -> None:
    """A banana-layout split of ``n`` size x size PNGs, one yellow box each."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (rng.randrange(40, 140),) * 3)
        w, h = rng.randrange(12, 24), rng.randrange(12, 24)
        x, y = rng.randrange(0, size - w), rng.randrange(0, size - h)
        ImageDraw.Draw(img).rectangle([x, y, x + w, y + h], fill=(230, 200, 40))
        img.save(folder / "images" / f"{i}.png")
        rows.append([f"{i}.png", 0, x, y, x + w, y + h])
    with open(folder / "label.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_name", "label", "xmin", "ymin", "xmax", "ymax"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    make_split(tmp / "data" / "bananas_val", 6)
    torch.manual_seed(0)
    save_model(TinySSD(1), tmp / "model.pt")
    return tmp


def test_evaluate_stage_writes_reports_and_logs_into_the_training_run(stage_inputs, mlflow_server, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run() as run:
        pass
    run_file = tmp_path / "mlflow_run.json"
    write_run_file(run.info.run_id, mlflow_server, run_file)
    reports = tmp_path / "reports"
    params = load_params(ROOT / "params.yaml", ["data.image_size=64", "evaluate.gallery_images=5"])

    metrics = evaluate(params, stage_inputs / "model.pt", stage_inputs / "data", reports, run_file)

    saved = json.loads((reports / "eval.json").read_text())
    assert set(saved.pop("provenance")) == set(PROVENANCE_KEYS)  # ssd.tracking.provenance, tested there
    assert saved == pytest.approx(metrics)
    for key in ("map_50", "map", "precision", "recall", "class_err", "bbox_mae"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["num_images"] == 6 and saved["num_objects"] == 6
    with open(reports / "pr_curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 101 and set(curve[0]) == {"threshold", "recall", "precision"}
    recalls = [float(r["recall"]) for r in curve]
    assert recalls == sorted(recalls, reverse=True)  # higher thresholds keep fewer detections
    with Image.open(reports / "pictures" / "pr_curve.png") as img:
        assert img.format == "PNG" and img.size == (500, 400)
    with Image.open(reports / "pictures" / "gallery.png") as img:
        assert img.format == "PNG" and img.size == (1200, 600)  # 5 images: 2 rows of 4, 300 px each

    logged = mlflow.MlflowClient(mlflow_server).get_run(run.info.run_id)
    assert logged.data.metrics["val_map_50"] == pytest.approx(metrics["map_50"])
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_server).list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/eval.json", "evaluation/pr_curve.csv", "evaluation/pictures"} <= artifacts


def test_evaluate_cli_without_run_file_still_writes_reports(stage_inputs, tmp_path, capsys):
    reports = tmp_path / "reports"
    rc = cli_main(["evaluate", "--params", str(ROOT / "params.yaml"), "-S", "data.image_size=64",
                   "-S", "evaluate.gallery_images=2", "--model", str(stage_inputs / "model.pt"),
                   "--data", str(stage_inputs / "data"), "--reports", str(reports),
                   "--run-file", str(tmp_path / "absent.json")])
    assert rc == 0
    assert "skipped MLflow logging" in capsys.readouterr().err
    assert {p.name for p in (reports / "pictures").iterdir()} == {"pr_curve.png", "gallery.png"}
    assert "map_50" in json.loads((reports / "eval.json").read_text())


def test_evaluate_with_a_run_not_in_this_store_still_writes_reports(stage_inputs, tmp_path, capsys):
    """A clone that `dvc pull`ed the model and the committed run file, with a store of its own:
    the run is not there, so MLflow logging is skipped with a warning and the reports are written."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_file = tmp_path / "mlflow_run.json"
    write_run_file("0123456789abcdef0123456789abcdef", store, run_file)
    reports = tmp_path / "reports"
    rc = cli_main(["evaluate", "--params", str(ROOT / "params.yaml"), "-S", "data.image_size=64",
                   "-S", "evaluate.gallery_images=2", "--model", str(stage_inputs / "model.pt"),
                   "--data", str(stage_inputs / "data"), "--reports", str(reports), "--run-file", str(run_file)])
    assert rc == 0
    assert "is not in" in capsys.readouterr().err
    assert "map_50" in json.loads((reports / "eval.json").read_text())


def test_evaluate_cli_missing_model_is_a_clear_error(stage_inputs, tmp_path, capsys):
    rc = cli_main(["evaluate", "--params", str(ROOT / "params.yaml"), "--model", str(tmp_path / "none.pt"),
                   "--data", str(stage_inputs / "data"), "--reports", str(tmp_path / "r")])
    assert rc == 1
    assert "none.pt" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
