"""The peer of ``benchmarks.peers``: Ultralytics YOLOv8n trained from its yaml (no pretrained weights).

Installed only for the benchmark (``pip install --no-deps ultralytics ultralytics-thop`` plus
``opencv-python-headless polars``); nothing in the project imports it. It runs offline: ``YOLO_OFFLINE=1``,
its settings (in a private config folder, not the user's) turn every logger callback off (MLflow, DVC,
ClearML, Comet, W&B, TensorBoard, Ray Tune) and telemetry, ``plots=False`` (no font download), ``amp=False``
(its AMP check downloads yolov8n.pt), ``val=False`` (the validation split chooses no checkpoint: the last
epoch's weights are scored, as the project's are). Its own recipe is otherwise its defaults (AdamW chosen
by ``optimizer=auto``, mosaic, EMA, batch 16), as a new user would run it.

The dataset folder (banana layout: ``train/`` and ``val/`` with ``images/`` and ``label.csv``) is
converted to YOLO's txt layout in a temporary folder, from the same label index the project reads.
Predictions come back in the same frame as the project's: the validation image resized to
``image_size`` x ``image_size`` (``ssd.engine.metrics`` scores them).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

INSTALL = "pip install --no-deps ultralytics ultralytics-thop && pip install opencv-python-headless polars"
OFF = {"sync": False, "mlflow": False, "dvc": False, "clearml": False, "comet": False, "wandb": False,
       "tensorboard": False, "raytune": False, "hub": False, "vscode_msg": False, "openvino_msg": False}


def available() -> bool:
    """Whether ``ultralytics`` can be imported (the benchmark skips the peer, saying so, if not)."""
    import importlib.util

    return importlib.util.find_spec("ultralytics") is not None


def _offline(config_dir: Path) -> None:
    """Settings for an offline run that logs nowhere; must precede the first ultralytics import."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from ultralytics import settings

    settings.update({k: v for k, v in OFF.items() if k in settings},
                    datasets_dir=str(config_dir), weights_dir=str(config_dir / "weights"),
                    runs_dir=str(config_dir / "runs"))


def write_yolo_layout(root: Path, classes: Sequence[str], out: Path) -> Path:
    """``root``'s splits as YOLO's ``images/<split>``, ``labels/<split>`` (normalised ``class cx cy w h``)
    under ``out``; returns its data yaml. Boxes come from the project's own label index."""
    from ssd.data.dataset import index_split
    from ssd.data.images import read_rgb
    from ssd.data.labels import find_split

    for split in ("train", "val"):
        index = index_split(find_split(root, split), classes)
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        for i, name in enumerate(index.names):
            width, height = read_rgb(index.image_dir / name).size
            shutil.copyfile(index.image_dir / name, out / "images" / split / name)
            lines = []
            for c, x1, y1, x2, y2 in index.boxes(i).tolist():
                lines.append(f"{int(c)} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                             f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
            (out / "labels" / split / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(classes))
    data = out / "data.yaml"
    data.write_text(f"path: {out}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def train_and_predict(root: Path, classes: Sequence[str], image_size: int, epochs: int, seed: int,
                      val_names: Sequence[str]) -> tuple[list[torch.Tensor], float]:
    """Train YOLOv8n from scratch on ``root``'s train split; return its detections on the validation
    images ``val_names`` (``Tensor[K, 6]`` rows ``(class, score, x1, y1, x2, y2)`` in the
    ``image_size``-square frame, at most 100, scores down to 0.001 as its own validation) and the
    training's wall time in seconds."""
    with tempfile.TemporaryDirectory(prefix="peer-yolo-") as tmp:
        tmp = Path(tmp)
        _offline(tmp / "config")
        from ultralytics import YOLO

        data = write_yolo_layout(root, classes, tmp / "data")
        model = YOLO("yolov8n.yaml")
        start = time.perf_counter()
        model.train(data=str(data), imgsz=image_size, epochs=epochs, seed=seed, deterministic=True,
                    device="cpu", workers=0, amp=False, plots=False, val=False, pretrained=False,
                    project=str(tmp / "runs"), name="train", exist_ok=True, verbose=False)
        seconds = time.perf_counter() - start
        last = YOLO(str(tmp / "runs" / "train" / "weights" / "last.pt"))
        preds = []
        for name in val_names:
            result = last.predict(str(tmp / "data" / "images" / "val" / name), imgsz=image_size, conf=0.001,
                                  iou=0.7, max_det=100, device="cpu", verbose=False, save=False)[0]
            height, width = result.orig_shape
            scale = torch.tensor([image_size / width, image_size / height] * 2)
            boxes = result.boxes
            preds.append(torch.cat((boxes.cls[:, None].float(), boxes.conf[:, None].float(),
                                    boxes.xyxy.float() * scale), dim=1))
    print(f"yolov8n: trained in {seconds:.0f} s", file=sys.stderr)
    return preds, seconds
