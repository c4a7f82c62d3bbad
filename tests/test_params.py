"""params.yaml loading and `key.sub=value` overrides."""
from pathlib import Path

import pytest

from ssd.params import apply_overrides, load_params

PARAMS = """\
base:
  seed: 0
data:
  source: auto
  classes: [banana]
  synthetic:
    seed: 0
    train: 1000
train:
  epochs: 20
  lr: 0.2
  compile: false
"""
PROJECT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    return path


class TestLoadParams:
    def test_plain(self, params_file):
        params = load_params(params_file)
        assert params["train"] == {"epochs": 20, "lr": 0.2, "compile": False}
        assert params["data"]["synthetic"]["train"] == 1000

    @pytest.mark.parametrize("override, section, key, value", [
        ("train.epochs=5", "train", "epochs", 5),
        ("train.lr=1e-3", "train", "lr", 1e-3),
        ("train.lr=0.05", "train", "lr", 0.05),
        ("train.lr=-2E+4", "train", "lr", -2e4),
        ("train.compile=true", "train", "compile", True),
        ("data.source=synthetic", "data", "source", "synthetic"),
        ("data.classes=[banana, apple]", "data", "classes", ["banana", "apple"]),
        ("data.source=a=b", "data", "source", "a=b"),  # only the first '=' splits
        ("base.seed=null", "base", "seed", None),
    ])
    def test_overrides_parsed_as_yaml(self, params_file, override, section, key, value):
        params = load_params(params_file, [override])
        assert params[section][key] == value
        assert type(params[section][key]) is type(value)

    def test_scientific_notation_in_file_is_a_float(self, tmp_path):
        # PyYAML alone (YAML 1.1) reads `1e-3` as a string; DVC (YAML 1.2) reads a float.
        path = tmp_path / "params.yaml"
        path.write_text("train:\n  lr: 1e-3\n  name: 1e\n")
        assert load_params(path)["train"] == {"lr": 0.001, "name": "1e"}

    def test_nested_and_repeated_overrides(self, params_file):
        params = load_params(params_file, ["data.synthetic.seed=3", "train.epochs=2", "train.epochs=4"])
        assert params["data"]["synthetic"]["seed"] == 3 and params["train"]["epochs"] == 4

    @pytest.mark.parametrize("override, match", [
        ("train.epoch=5", r"override 'train.epoch=5': .*params.yaml has no key 'train.epoch'"),
        ("trian.epochs=5", r"has no section 'trian'"),
        ("train.epochs.deep=5", r"has no section 'epochs'"),
        ("seed=1", r"has no key 'seed'"),
        ("train.epochs", r"override 'train.epochs' is not of the form key.sub=value"),
        ("=5", r"override '=5' is not of the form key.sub=value"),
    ])
    def test_refused_overrides(self, params_file, override, match):
        with pytest.raises(ValueError, match=match):
            load_params(params_file, [override])

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="params file not found: .*missing.yaml"):
            load_params(tmp_path / "missing.yaml")

    def test_not_a_mapping(self, tmp_path):
        path = tmp_path / "list.yaml"
        path.write_text("- a\n- b\n")
        with pytest.raises(ValueError, match="list.yaml: expected a mapping at the top level"):
            load_params(path)

    def test_apply_overrides_does_not_mutate_its_input(self):
        params = {"train": {"epochs": 1}}
        assert apply_overrides(params, ["train.epochs=9"]) == {"train": {"epochs": 9}}
        assert params == {"train": {"epochs": 1}}

    def test_project_params_file(self):
        params = load_params(PROJECT_PARAMS)
        assert {"base", "data", "model", "train", "evaluate", "registry"} <= set(params)
        assert params["model"]["sizes"] == [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
