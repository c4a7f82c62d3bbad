"""Evaluation: COCO mAP through torchmetrics on hand-made cases, matching, and the whole stage."""
import csv
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from ssd.cli import main as cli_main
from ssd.core.anchors import multibox_detection
from ssd.core.model import TinySSD, save_model
from ssd.engine.figures import gallery_indices
from ssd.engine.metrics import (confusion_matrix, confusion_summary, detection_metrics, flat_per_class, match_detections,
                                per_class_ap, precision_recall)
from ssd.mlops.provenance import PROVENANCE_KEYS
from ssd.mlops.tracking import write_run_file
from ssd.stages.evaluate import evaluate
from ssd.util.params import load_settings

ROOT = Path(__file__).resolve().parents[2]

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


# Two classes: an "apple" (0) in each image, a "pear" (1) in the second.
TWO_TRUTH = [torch.tensor([[0, 10, 10, 50, 50.], [-1, -1, -1, -1, -1]]),
             torch.tensor([[0, 100, 100, 150, 160.], [1, 20, 20, 60, 90.]])]
CLASSES = ["apple", "pear"]


class TestPerClass:
    def test_perfect_for_one_class_none_for_the_other(self):
        per_class = per_class_ap(PERFECT, TWO_TRUTH, CLASSES)
        assert per_class == {"apple": {"ap50": 1.0, "ap": 1.0, "num_objects": 2},
                             "pear": {"ap50": 0.0, "ap": 0.0, "num_objects": 1}}
        assert detection_metrics(PERFECT, TWO_TRUTH, 0.9)["map_50"] == pytest.approx(0.5)  # the mean of the two

    def test_per_class_ap_means_to_coco_map(self):
        preds = [det([0, 0.9, 10, 10, 50, 62], [1, 0.8, 12, 10, 50, 50]),
                 det([1, 0.7, 20, 22, 60, 90], [0, 0.6, 100, 100, 150, 150], [1, 0.95, 0, 0, 9, 9])]
        per_class = per_class_ap(preds, TWO_TRUTH, CLASSES)
        overall = detection_metrics(preds, TWO_TRUTH, 0.5)
        for key, coco in (("ap50", "map_50"), ("ap", "map")):
            assert sum(v[key] for v in per_class.values()) / 2 == pytest.approx(overall[coco]), key
        assert 0 < per_class["pear"]["ap50"] < 1  # its best-scoring detection is a false positive

    def test_class_without_ground_truth_is_minus_one_and_not_logged(self):
        per_class = per_class_ap(PERFECT, TRUTH, ["banana", "kiwi"])
        assert per_class["kiwi"] == {"ap50": -1.0, "ap": -1.0, "num_objects": 0}
        assert flat_per_class(per_class) == {"ap50/banana": 1.0, "ap/banana": 1.0}


class TestConfusion:
    def test_top_detection_at_half_iou_decides(self):
        preds = [det([1, 0.9, 10, 10, 50, 50], [0, 0.5, 10, 10, 50, 50]),  # apple taken for a pear
                 det([0, 0.9, 100, 100, 150, 160], [0, 0.99, 0, 0, 5, 5])]  # apple right; pear missed
        matrix = confusion_matrix(preds, TWO_TRUTH, 2)
        assert matrix.tolist() == [[1, 1, 0], [0, 0, 1]]
        summary = confusion_summary(matrix, CLASSES)
        assert summary["labels"] == ["apple", "pear", "none"]
        assert summary["confused"] == [{"truth": "apple", "predicted": "pear", "count": 1, "fraction": 0.5}]

    def test_no_detections_are_all_missed(self):
        assert confusion_matrix([det(), det()], TWO_TRUTH, 2).tolist() == [[0, 0, 2], [0, 0, 1]]


class TestGalleryChoice:
    def test_every_class_appears_first_then_the_rest_in_order(self):
        labels = torch.full((6, 2, 5), -1.0)
        labels[:4, 0, 0] = 0          # images 0-3: class 0
        labels[4, 0, 0] = 1           # image 4: class 1
        labels[5, :, 0] = 2           # image 5: class 2 twice
        assert gallery_indices(labels, 3, 3) == [0, 4, 5]
        assert gallery_indices(labels, 3, 5) == [0, 4, 5, 1, 2]
        assert gallery_indices(labels, 3, 10) == [0, 4, 5, 1, 2, 3]
        assert gallery_indices(labels, 3, 0) == []
        # Each image's rows without padding, as scoring keeps them (image 3 here has none): the same choice.
        rows = [image[image[:, 0] >= 0] for image in labels]
        rows[3] = rows[3][:0]
        assert gallery_indices(rows, 3, 5) == [0, 4, 5, 1, 2]
        assert gallery_indices(rows, 3, 10) == [0, 4, 5, 1, 2, 3]


def test_per_class_nms_keeps_overlapping_boxes_of_other_classes():
    # Two anchors on the same place, one scored apple, the other pear: class-agnostic NMS keeps one.
    anchors = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]]])
    probs = torch.tensor([[[0.1, 0.1], [0.8, 0.1], [0.1, 0.8]]])   # [B, C + 1, A]
    offsets = torch.zeros(1, 8)
    kept = {False: 1, True: 2}
    for per_class, n in kept.items():
        out = multibox_detection(probs, offsets, anchors, 0.5, per_class=per_class)
        assert int((out[0, :, 0] >= 0).sum()) == n, per_class


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
    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", "evaluate.gallery_images=5"])

    metrics = evaluate(settings, stage_inputs / "model.pt", stage_inputs / "data", reports, run_file)

    saved = json.loads((reports / "eval.json").read_text())
    assert set(saved.pop("provenance")) == set(PROVENANCE_KEYS)  # ssd.mlops.provenance.provenance, tested there
    assert saved == metrics  # JSON floats round-trip exactly
    assert saved["per_class"]["banana"]["ap50"] == pytest.approx(saved["map_50"])  # one class: its AP is the mAP
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
    assert logged.data.metrics["val_ap50/banana"] == pytest.approx(metrics["per_class"]["banana"]["ap50"])
    assert logged.data.metrics["val_ap/banana"] == pytest.approx(metrics["per_class"]["banana"]["ap"])
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
    assert {p.name for p in (reports / "pictures").iterdir()} == {"pr_curve.png", "gallery.png", "confusion.png"}
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


def test_evaluate_on_a_generated_two_class_dataset(tmp_path):
    """Per-class figures for both classes, a confusion summary, and a gallery showing both."""
    import zipfile

    from ssd.engine.evaluation import load_validation
    from ssd.data.synthetic import generate_archive

    classes = ["banana", "apple"]
    generate_archive(tmp_path / "two.zip", seed=3, train=1, val=10, max_objects=3, classes=classes)
    with zipfile.ZipFile(tmp_path / "two.zip") as zf:
        zf.extractall(tmp_path / "data")
    (data,) = (tmp_path / "data").iterdir()
    torch.manual_seed(0)
    save_model(TinySSD(2, classes=classes), tmp_path / "model.pt")
    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", "data.classes=[banana, apple]",
                                                    "evaluate.gallery_images=2", "evaluate.nms=per_class"])

    metrics = evaluate(settings, tmp_path / "model.pt", data, tmp_path / "reports", tmp_path / "none.json")

    saved = json.loads((tmp_path / "reports" / "eval.json").read_text())
    assert set(saved["per_class"]) == set(classes)
    assert sum(v["num_objects"] for v in saved["per_class"].values()) == saved["num_objects"]
    for values in saved["per_class"].values():
        assert values["num_objects"] > 0 and 0.0 <= values["ap50"] <= 1.0 and 0.0 <= values["ap"] <= values["ap50"]
    matrix = saved["confusion"]["matrix"]
    assert saved["confusion"]["labels"] == [*classes, "none"] and len(matrix) == 2 and len(matrix[0]) == 3
    assert [sum(row) for row in matrix] == [saved["per_class"][c]["num_objects"] for c in classes]
    assert metrics["per_class"] == saved["per_class"]
    # The gallery's two images hold both classes, though the first two images of the split may not.
    dataset = load_validation(settings.data, data)
    labels = [dataset[i][1] for i in range(len(dataset))]
    shown = torch.cat([labels[i] for i in gallery_indices(labels, 2, 2)])
    assert {0.0, 1.0} <= set(shown[:, 0].tolist())
    assert {p.name for p in (tmp_path / "reports" / "pictures").iterdir()} == {"pr_curve.png", "gallery.png",
                                                                               "confusion.png"}
