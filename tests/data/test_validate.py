"""ssd.data.checks: a clean dataset gets its report; every kind of damage is refused, all of it listed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from archive_helpers import good_zip, tree_hash
from ssd.data.checks import run_validation

TRAIN = Path("banana-detection/bananas_train")
VAL = Path("banana-detection/bananas_val")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    archive = good_zip(root / "a.zip", max_objects=2, classes=["banana", "apple"])
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root / "raw")
    return root / "raw"


@pytest.fixture
def data(clean, tmp_path) -> Path:
    shutil.copytree(clean, tmp_path / "raw")
    return tmp_path / "raw"


CLASSES = ["banana", "apple"]


def edit_labels(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def test_clean_dataset_gets_report_and_samples(data, tmp_path):
    report = run_validation(data, tmp_path / "reports", 256, CLASSES)
    saved = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert saved == report and report["problems"] == []
    assert report["splits"]["train"]["images"] == 8 and report["splits"]["val"]["images"] == 4
    assert sum(report["splits"]["train"]["classes"].values()) == report["splits"]["train"]["label_rows"]
    assert 32 <= report["splits"]["train"]["box_width"]["min"] <= report["splits"]["train"]["box_width"]["max"] <= 75
    with Image.open(tmp_path / "reports" / "samples.png") as grid:
        assert grid.mode == "RGB" and grid.size == (4 * 256, 2 * 256)


def _damage(kind: str, root: Path) -> str:
    """Damage the dataset one way; returns a regex the error must contain."""
    train, val = root / TRAIN, root / VAL
    if kind == "corrupt png":
        p = train / "images" / "3.png"
        p.write_bytes(p.read_bytes()[:200])
        return r"bananas_train/images/3\.png: cannot be read as an image"
    if kind == "wrong size":
        Image.new("RGB", (128, 128)).save(val / "images" / "1.png")
        return r"bananas_val/images/1\.png: size 128x128, expected 256x256"
    if kind == "grey image":
        Image.open(train / "images" / "2.png").convert("L").save(train / "images" / "2.png")
        return r"bananas_train/images/2\.png: mode L, expected RGB"
    if kind == "missing image":
        (train / "images" / "5.png").unlink()
        return r"bananas_train/label\.csv row \d+: image .*5\.png does not exist"
    if kind == "missing column":
        edit_labels(val / "label.csv", lambda ls: [",".join(line.split(",")[:-1]) for line in ls])
        return r"bananas_val/label\.csv: missing column\(s\) ymax"
    if kind == "out of range":
        edit_labels(train / "label.csv", lambda ls: ls[:2] + [ls[2].rsplit(",", 2)[0] + ",300," + ls[2].rsplit(",", 1)[1]] + ls[3:])
        return r"bananas_train/label\.csv row 3: x range .*300 is not 0 <= xmin < xmax <= 256"
    if kind == "inverted":
        def swap(ls):
            name, cls, x1, y1, x2, y2 = ls[1].split(",")
            return [ls[0], ",".join([name, cls, x1, y2, x2, y1])] + ls[2:]
        edit_labels(val / "label.csv", swap)
        return r"bananas_val/label\.csv row 2: y range"
    if kind == "nan":
        edit_labels(train / "label.csv", lambda ls: ls[:4] + [ls[4].replace(ls[4].split(",")[2], "nan", 1)] + ls[5:])
        return r"bananas_train/label\.csv row 5: not finite numbers: xmin"
    if kind == "duplicate row":
        edit_labels(train / "label.csv", lambda ls: ls + [ls[1]])
        return r"bananas_train/label\.csv row \d+: duplicate of row 2"
    if kind == "class out of range":
        edit_labels(val / "label.csv", lambda ls: ls[:3] + [ls[3].replace(",0,", ",7,").replace(",1,", ",7,", 1)] + ls[4:])
        return r"bananas_val/label\.csv row 4: class '7' out of range 0\.\.1"
    if kind == "unlabelled image":
        Image.new("RGB", (256, 256)).save(train / "images" / "extra.png")
        return r"bananas_train/images/extra\.png: image has no label row"
    raise AssertionError(kind)


KINDS = ["corrupt png", "wrong size", "grey image", "missing image", "missing column", "out of range",
         "inverted", "nan", "duplicate row", "class out of range", "unlabelled image"]


@pytest.mark.parametrize("kind", KINDS)
def test_damage_is_refused_with_file_and_row(kind, data, tmp_path):
    reports = tmp_path / "reports"
    run_validation(data, reports, 256, CLASSES)  # a stale "valid" report that must not survive
    pattern = _damage(kind, data)
    before = tree_hash(data)
    with pytest.raises(ValueError, match=pattern):
        run_validation(data, reports, 256, CLASSES)
    assert tree_hash(data) == before
    assert not (reports / "validation.json").exists() and not (reports / "samples.png").exists()


def test_every_problem_is_listed_not_only_the_first(data, tmp_path):
    patterns = [_damage(k, data) for k in ("corrupt png", "nan", "inverted", "unlabelled image")]
    with pytest.raises(ValueError) as err:
        run_validation(data, tmp_path / "reports", 256, CLASSES)
    for pattern in patterns:
        assert re.search(pattern, str(err.value)), pattern
    assert str(err.value).startswith("4 problem(s)")


def test_class_names_are_accepted(data, tmp_path):
    edit_labels(data / TRAIN / "label.csv", lambda ls: [ls[0]] + [l.replace(",0,", ",banana,", 1) for l in ls[1:]])
    report = run_validation(data, tmp_path / "reports", 256, CLASSES)
    assert report["splits"]["train"]["classes"]["banana"] >= 1


def test_photos_of_any_size_and_mode_pass_when_not_strict(data, tmp_path):
    """data.strict: false: photos as they come (other sizes, RGBA, grey, palette, PNG named .jpg)
    pass, and their boxes are still checked against each image's own size."""
    labels = data / TRAIN / "label.csv"
    name = labels.read_text().splitlines()[1].split(",")[0]
    with Image.open(data / TRAIN / "images" / name) as img:
        img.convert("RGBA").resize((640, 480)).save(data / TRAIN / "images" / name, format="PNG")
    Image.open(data / VAL / "images" / "0.png").convert("P").save(data / VAL / "images" / "0.png")
    edit_labels(labels, lambda ls: [ls[0], f"{name},0,600,400,640,480"] + ls[2:])
    with pytest.raises(ValueError, match=r"size 640x480, expected 256x256"):
        run_validation(data, tmp_path / "strict", 256, CLASSES)
    report = run_validation(data, tmp_path / "reports", 256, CLASSES, strict=False)
    assert report["problems"] == []
    edit_labels(labels, lambda ls: [l.replace(f"{name},0,600,400,640,480", f"{name},0,600,400,641,480")
                                    for l in ls])
    with pytest.raises(ValueError, match=r"641"):  # past the 640-pixel-wide image's edge
        run_validation(data, tmp_path / "reports", 256, CLASSES, strict=False)


def test_cli_exits_nonzero_and_writes_nothing(data, tmp_path):
    _damage("grey image", data)
    _damage("duplicate row", data)
    root = Path(__file__).resolve().parents[2]
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-m", "ssd", "validate", "--data", str(data), "--out", "reports",
                          "-S", f"data.classes={json.dumps(CLASSES)}", "-S", "data.image_size=256"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 1
    assert "2.png: mode L" in run.stderr and "duplicate of row 2" in run.stderr
    assert not (tmp_path / "reports").exists()


def test_a_process_pool_names_the_same_problems(data, monkeypatch, capsys):
    from ssd.data import checks

    monkeypatch.setattr(checks, "PARALLEL_CHECK_MIN_IMAGES", 1)  # the pool even for 12 images
    checks.validate(data, 256, CLASSES, workers=2)  # a clean dataset: its rate on stderr
    assert re.search(r"validate: \d+ images in .* s \(\d+ images/s, 2 process\(es\)\)", capsys.readouterr().err)
    for kind in ("corrupt png", "grey image", "wrong size", "nan", "unlabelled image"):
        _damage(kind, data)
    errors = {}
    for workers in (1, 2):
        with pytest.raises(ValueError) as err:
            checks.validate(data, 256, CLASSES, workers=workers)
        errors[workers] = str(err.value)
        assert capsys.readouterr().err == ""  # a refusal is its one line, nothing before it
    assert errors[1] == errors[2] and errors[1].startswith("6 problem(s)")  # the 128 px image fails its box too
