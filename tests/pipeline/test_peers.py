"""benchmarks/peers.py: every system scored the same way in the same frame, the YOLO layout, and one tiny run.

The YOLO peer needs ultralytics, which only the benchmark installs: without it the tiny run checks the
project's systems alone and says that the peer was skipped.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import peer_yolo
from benchmarks.peers import ground_truth, score
from tests.tiny_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("peers"), train=8, val=4, size=48)


def test_ground_truth_scored_as_detections_is_perfect_in_the_square_frame(data):
    names, targets = ground_truth(data, ["banana"], 64)
    assert names == ["0.png", "1.png", "2.png", "3.png"] and all(len(t) == 1 for t in targets)
    _, native = ground_truth(data, ["banana"], 48)  # the images are 48 px: that frame is their pixels
    torch.testing.assert_close(targets[0][:, 1:], native[0][:, 1:] * 64 / 48)
    preds = [torch.cat((t[:, :1], torch.ones(len(t), 1), t[:, 1:]), dim=1) for t in targets]
    result = score(preds, targets, ["banana"])
    assert result["map_50"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    assert result["per_class"]["banana"] == pytest.approx({"ap50": 1.0, "ap": 1.0, "num_objects": 4})
    shifted = [p + torch.tensor([0, 0, 20, 20, 20, 20]) for p in preds]
    assert score(shifted, targets, ["banana"])["map"] < 0.5


def test_the_yolo_layout_holds_the_same_boxes_normalised(data, tmp_path):
    out = peer_yolo.write_yolo_layout(data, ["banana"], tmp_path / "yolo")
    assert "names:\n  0: banana" in out.read_text()
    _, targets = ground_truth(data, ["banana"], 48)  # the images are 48 px: this frame is their pixels
    for i, target in enumerate(targets):
        cls, cx, cy, w, h = map(float, (tmp_path / "yolo" / "labels" / "val" / f"{i}.txt").read_text().split())
        x1, y1, x2, y2 = target[0, 1:].tolist()
        assert cls == 0 and [cx, cy, w, h] == pytest.approx([(x1 + x2) / 96, (y1 + y2) / 96, (x2 - x1) / 48,
                                                             (y2 - y1) / 48], abs=1e-6)
        with Image.open(tmp_path / "yolo" / "images" / "val" / f"{i}.png") as img:
            assert img.size == (48, 48)


@pytest.mark.slow
def test_one_tiny_benchmark_run_scores_every_system(data, tmp_path):
    work, out = tmp_path / "work", tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", str(data), "--classes", "banana",
                           "--image-sizes", "64", "--epochs", "1", "--seeds", "0", "--work", str(work),
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    systems = ["book", "photos"] + (["yolov8n"] if peer_yolo.available() else [])
    if not peer_yolo.available():
        assert "yolov8n skipped: ultralytics is not installed" in proc.stderr
    table = out.read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == systems
    results = {r["settings"]["system"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert sorted(results) == sorted(systems)
    for result in results.values():
        assert 0 <= result["map"] <= result["map_50"] <= 1 and result["train_seconds"] > 0
        assert result["per_class"]["banana"]["num_objects"] == 4
    assert results["photos"]["detection"] == {"evaluate.nms": "per_class", "evaluate.nms_threshold": 0.5}
    assert results["book"]["detection"]["evaluate.nms"] == "agnostic"  # params.yaml's: the book carries none
    assert results["photos"]["anchors"] != results["book"]["anchors"]  # fitted to the boxes
    # A second run reuses every result instead of training again.
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0 and again.stderr.count("reused") == len(systems)
