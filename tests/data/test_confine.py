"""A dataset folder never leads outside itself: symlinks out of a fetch source (files and folders) refuse
the folder, links inside it are copied as plain files, and label rows naming a path outside the split's
images/ (absolute, or through ..) are refused by validate and by the reader that train and evaluate use.

The folders, links and files outside them are made here; the "private" file is a readable PNG, so
nothing but the confinement can stop it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from archive_helpers import TINY
from ssd.cli import main as cli_main
from ssd.data.checks import run_validation
from ssd.data.dataset import load_dataset
from ssd.data.fetch import fetch
from ssd.data.source import check_source
from ssd.util.settings import DataSettings, Settings
from tiny_data import write_split

ROOT = Path(__file__).resolve().parents[2]


def data_settings(source: str) -> DataSettings:
    return Settings.from_params({"data": {"source": source, "url": None, "sha1": None, "image_size": 32,
                                          "classes": ["banana"], "synthetic": dict(TINY)}}).data


def private_png(path: Path) -> bytes:
    """A PNG outside every dataset, its bytes unlike any tiny_data image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), 123, dtype=np.uint8)).save(path)
    return path.read_bytes()


def source_folder(root: Path) -> Path:
    write_split(root / "train", 3, size=32)
    write_split(root / "val", 2, size=32, seed=1)
    return root


def leak(source: Path, outside: Path, kind: str) -> Path:
    """Make ``source`` lead to ``outside`` one way; returns the link."""
    if kind == "file":
        link = source / "train" / "images" / "leak.png"
        link.symlink_to(outside / "private.png")
    elif kind == "images folder":
        link = source / "val" / "images"
        os.rename(link, outside / "images")
        link.symlink_to(outside / "images")
    else:  # a split folder, through a relative link
        link = source / "val"
        os.rename(link, outside / "val")
        link.symlink_to(os.path.relpath(outside / "val", source))
    return link


def no_file_holds(folder: Path, data: bytes) -> bool:
    return not folder.exists() or all(p.read_bytes() != data for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["file", "images folder", "split folder"])
def test_a_symlink_out_of_a_folder_source_is_refused_naming_link_and_target(kind, tmp_path, capsys):
    outside = tmp_path / "private"
    secret = private_png(outside / "private.png")
    source = source_folder(tmp_path / "source")
    link = leak(source, outside, kind)
    target = os.path.realpath(link)
    project = tmp_path / "project"

    with pytest.raises(ValueError) as info:
        fetch(str(source), None, project / "data" / "raw", data_settings(str(source)), progress=False)
    message = str(info.value)
    assert "\n" not in message and f"{link} is a symlink to {target}, outside the source folder" in message
    assert not (project / "data" / "raw").exists() and no_file_holds(project, secret)
    with pytest.raises(ValueError, match="is a symlink to .* outside the source folder"):  # the source stage
        check_source(str(source), data_settings(str(source)), project / "data" / "source.json", project / "data" / "raw")
    assert not (project / "data" / "source.json").exists()

    code = cli_main(["fetch", "--source", str(source), "--out", str(project / "data" / "raw"), "--quiet",
                     "--params", str(ROOT / "params.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and str(link) in err and target in err


def test_a_symlink_inside_the_folder_is_copied_as_the_file_it_points_to(tmp_path):
    source = source_folder(tmp_path / "source")
    shared = source / "val" / "images" / "0.png"
    shared.unlink()
    shared.symlink_to(Path("..", "..", "train", "images", "0.png"))  # one picture in both splits
    out = tmp_path / "raw"
    fetch(str(source), None, out, data_settings(str(source)), progress=False)
    copied = out / "banana-detection" / "bananas_val" / "images" / "0.png"
    assert not copied.is_symlink() and copied.read_bytes() == (source / "train" / "images" / "0.png").read_bytes()
    assert not [p for p in out.rglob("*") if p.is_symlink()]


def dataset_with_row(tmp_path: Path, img_name: str) -> Path:
    """A dataset whose train label file has one more row, naming ``img_name``; a readable PNG is where
    the name leads (outside images/)."""
    data = tmp_path / "raw"
    train = write_split(data / "train", 3, size=32)
    write_split(data / "val", 2, size=32, seed=1)
    private_png(train / "secret.png")  # beside images/, as `../secret.png` names it
    private_png(tmp_path / "elsewhere.png")
    with open(train / "label.csv", "a") as f:
        f.write(f"{img_name},0,1,1,20,20\n")
    return data


@pytest.mark.parametrize("name", ["../secret.png", "{tmp}/elsewhere.png", "x/../../secret.png"])
def test_a_label_row_naming_a_path_outside_images_is_refused_by_validate_and_the_reader(name, tmp_path):
    name = name.format(tmp=tmp_path)
    data = dataset_with_row(tmp_path, name)
    labels = data / "train" / "label.csv"
    expected = f"{labels} row 5: img_name {name!r} names a path outside {data / 'train' / 'images'}"
    with pytest.raises(ValueError) as info:
        run_validation(data, tmp_path / "reports", 32, ["banana"])
    assert expected in str(info.value) and "does not exist" not in str(info.value)
    with pytest.raises(ValueError) as info:  # what `ssd train` and `ssd evaluate` read, run by hand
        load_dataset(data, "train", 32)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)
