"""Where things live on disk, defined once: the dataset's layout and the workspace's paths.

The dataset (the d2l banana archive's layout)::

    banana-detection/                    DATASET_DIR (under data/raw, beside MANIFEST)
        bananas_train/ bananas_val/      SPLIT_DIRS
            images/0.png ...             IMAGES_DIR
            label.csv                    LABEL_FILE, header LABEL_COLUMNS

Readers, the fetch stage, the synthetic generator and the tests' fixtures all spell it from here.

The workspace: every path a stage reads or writes by default, relative to the project root (the
outputs ``dvc.yaml`` names). Only the stages (``ssd.stages``) and the flow use them; the code below
them takes paths as arguments.
"""
from __future__ import annotations

from pathlib import Path

DATASET_DIR = "banana-detection"
SPLIT_DIRS = {"train": "bananas_train", "val": "bananas_val"}
IMAGES_DIR = "images"
LABEL_FILE = "label.csv"
LABEL_COLUMNS = ("img_name", "label", "xmin", "ymin", "xmax", "ymax")  # one row per box, pixel corners
LABEL_HEADER = ",".join(LABEL_COLUMNS)
MANIFEST = "manifest.json"  # beside DATASET_DIR: what the fetch stage fetched, and from which source


def dataset_root(path: str | Path) -> Path:
    """``data/raw`` and ``data/raw/banana-detection`` both name the dataset: the latter."""
    path = Path(path)
    return path / DATASET_DIR if (path / DATASET_DIR).is_dir() else path


# The workspace (dvc.yaml's outputs)
RAW_DIR = Path("data/raw")                             # fetch: the dataset + manifest.json (DVC-cached)
DATASET_ROOT = RAW_DIR / DATASET_DIR                   # what train and evaluate read
SOURCE_FILE = Path("data/source.json")                 # source: the data source's fingerprint
DATA_REPORTS = Path("data/reports")                    # validate: validation.json, samples.png
MODEL_FILE = Path("models/model.pt")                   # train: the final weights
CHECKPOINT_DIR = Path("models/checkpoints")            # train: one checkpoint per epoch (resume)
RUN_FILE = Path("models/mlflow_run.json")              # train: the MLflow run this model came from
REPORTS = Path("reports")                              # evaluate: eval.json, pr_curve.csv, pictures/
TRAIN_METRICS = REPORTS / "train.json"
TRAIN_HISTORY = REPORTS / "train_history.csv"
TRAIN_CURVE = REPORTS / "train_curve.png"
EVAL_FILE = REPORTS / "eval.json"
GALLERY_PICTURE = "gallery.png"                        # evaluate: detections on a few images, in pictures/
REGISTRATION_FILE = REPORTS / "registration.json"      # register: the version, aliases and decision
