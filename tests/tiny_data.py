"""Tiny detection datasets in the banana layout, for tests that must not wait for the real one.

Each image is noise with one coloured rectangle; its box is the label (class 0).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ssd.data.layout import DATASET_DIR, IMAGES_DIR, LABEL_COLUMNS, LABEL_FILE, SPLIT_DIRS


def write_split(split_dir: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (split_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
        w, h = rng.integers(size // 4, size // 2, size=2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        img[y:y + h, x:x + w] = rng.integers(150, 256, size=3, dtype=np.uint8)
        Image.fromarray(img).save(split_dir / IMAGES_DIR / f"{i}.png")
        rows.append([f"{i}.png", 0, int(x), int(y), int(x + w), int(y + h)])
    with open(split_dir / LABEL_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    return split_dir


def write_dataset(root: Path, train: int = 16, val: int = 8, size: int = 64, seed: int = 0) -> Path:
    """``root/banana-detection/{bananas_train,bananas_val}``; returns ``root/banana-detection``."""
    data = Path(root) / DATASET_DIR
    write_split(data / SPLIT_DIRS["train"], train, size, seed)
    write_split(data / SPLIT_DIRS["val"], val, size, seed + 1)
    return data


def grow(data: Path, factor: int, split: str = SPLIT_DIRS["train"]) -> None:
    """``factor`` times a split of ``data`` (the train split by default), as hard links of its images."""
    import os

    split = data / split
    lines = (split / LABEL_FILE).read_text().splitlines()
    out = [lines[0]]
    for k in range(factor):
        for line in lines[1:]:
            name, rest = line.split(",", 1)
            if k:
                os.link(split / IMAGES_DIR / name, split / IMAGES_DIR / f"{k}_{name}")
            out.append(f"{k}_{name},{rest}" if k else line)
    (split / LABEL_FILE).write_text("\n".join(out) + "\n")


def make_project(root: Path, *, images: int = 8, size: int = 64, **train: object) -> Path:
    """A project folder for ``ssd train`` run from it: ``params.yaml`` (the repository's, shrunk
    for tests; ``train`` entries override) and a tiny dataset in ``data/raw``."""
    import yaml

    root = Path(root)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["data"]["image_size"] = size
    params["train"].update({"epochs": 2, "batch_size": 4, "precision": "fp32", "deterministic": True,
                            "channels_last": True, "compile": False, "num_workers": 0, "nproc": 1, **train})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_dataset(root / "data" / "raw", train=images, val=4, size=size)
    return root


FAULTS = str(Path(__file__).with_name("faults.py"))  # `ssd train` with test faults (see faults.py)


def train_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The environment for a training subprocess: two threads at most, the given MLflow server."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSD_TEST_FAULT", "TORCHELASTIC"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    # faults.py imports the tests' helpers and the package from the checkout under test.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    return env


def torchrun() -> str:
    import sys

    return str(Path(sys.executable).with_name("torchrun"))
