"""Typed settings: params.yaml as frozen dataclasses, narrowed to what a stage declares."""
import dataclasses
from pathlib import Path

import pytest

from ssd.util.params import load_params, load_settings
from ssd.util.settings import NMS_MODES, PRECISIONS, SCHEMA, Settings, TrainSettings

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"


def test_every_key_of_the_file_is_a_typed_field():
    settings = load_settings(PARAMS_FILE)
    assert settings.train.epochs == load_params(PARAMS_FILE)["train"]["epochs"]
    assert settings.model.sizes[0] == (0.2, 0.272) and settings.data.classes == ("banana",)
    assert settings.as_dict() == load_params(PARAMS_FILE)  # lists again, in the file's order


def test_settings_are_frozen():
    settings = load_settings(PARAMS_FILE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train.epochs = 3  # type: ignore[misc]


def test_an_undeclared_key_cannot_be_read():
    settings = load_settings(PARAMS_FILE, ["train.epochs=3"], ("train.epochs", "data.image_size"))
    assert settings.train.epochs == 3 and settings.data.image_size == 256
    with pytest.raises(AttributeError, match=r"param train\.lr is not among the params this stage declares"):
        settings.train.lr
    with pytest.raises(AttributeError, match=r"param model is not among"):
        settings.model
    assert settings.as_dict() == {"data": {"image_size": 256}, "train": {"epochs": 3}}


def test_the_schema_is_derived_from_the_fields():
    assert SCHEMA["train.precision"].expected == f"one of {', '.join(PRECISIONS)}"
    assert SCHEMA["evaluate.nms"].expected == f"one of {', '.join(NMS_MODES)}"
    assert [k for k in SCHEMA if k.startswith("train.")] == [f"train.{f.name}" for f in dataclasses.fields(TrainSettings)]
    assert "data.synthetic.max_objects" in SCHEMA and "data.synthetic" not in SCHEMA
    assert list(Settings.__dataclass_fields__) == ["base", "data", "model", "train", "evaluate", "registry"]
