"""params.yaml: loading, `key.sub=value` overrides, and the schema every stage's params pass."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssd.cli import COMMANDS
from ssd.cli import main as cli_main
from ssd.util.params import SCHEMA, apply_overrides, check_params, load_params, parse_yaml, select_params

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PARAMS = ROOT / "params.yaml"
STAGES = ("source", "fetch", "validate", "train", "evaluate", "register")


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PROJECT_PARAMS.read_text())
    return path


def edited(path: Path, old: str, new: str) -> Path:
    """``path`` with the one occurrence of ``old`` replaced by ``new``."""
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return path


class TestLoadParams:
    def test_project_params_file(self):
        params = load_params(PROJECT_PARAMS)
        assert list(params) == ["base", "data", "model", "train", "evaluate", "registry"]
        assert params["model"]["sizes"] == [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]

    def test_schema_and_project_file_name_the_same_keys(self):
        def leaves(node, prefix=""):
            for key, value in node.items():
                if f"{prefix}{key}" in SCHEMA or not isinstance(value, dict):
                    yield f"{prefix}{key}"
                else:
                    yield from leaves(value, f"{prefix}{key}.")
        assert list(leaves(load_params(PROJECT_PARAMS))) == list(SCHEMA)

    @pytest.mark.parametrize("override, section, key, value", [
        ("train.epochs=5", "train", "epochs", 5),
        ("train.lr=1e-3", "train", "lr", 1e-3),
        ("train.lr=0.05", "train", "lr", 0.05),
        ("train.lr=2E+4", "train", "lr", 2e4),
        ("train.compile=true", "train", "compile", True),
        ("data.source=synthetic", "data", "source", "synthetic"),
        ("data.classes=[banana, apple]", "data", "classes", ["banana", "apple"]),
        ("data.source=a=b", "data", "source", "a=b"),  # only the first '=' splits
        ("data.sha1=null", "data", "sha1", None),
    ])
    def test_overrides_parsed_as_yaml(self, params_file, override, section, key, value):
        params = load_params(params_file, [override])
        assert params[section][key] == value
        assert type(params[section][key]) is type(value)

    def test_scientific_notation_is_a_float(self, params_file):
        # PyYAML alone (YAML 1.1) reads `1e-3` as a string; DVC (YAML 1.2) reads a float.
        assert load_params(edited(params_file, "lr: 0.2 ", "lr: 1e-3 "))["train"]["lr"] == 0.001
        assert parse_yaml("lr: 1e-3\nname: 1e\n", "x") == {"lr": 0.001, "name": "1e"}

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
    def test_refused_override_keys(self, params_file, override, match):
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


class TestSchema:
    @pytest.mark.parametrize("override, message", [
        ("train.epochs=abc", "-S train.epochs=abc: expected an integer >= 1"),
        ("train.epochs=1.5", "-S train.epochs=1.5: expected an integer >= 1"),  # not silently 1 epoch
        ("train.epochs=0", "-S train.epochs=0: expected an integer >= 1"),
        ("train.epochs=true", "-S train.epochs=true: expected an integer >= 1"),
        ("train.lr=", "-S train.lr=: expected a number > 0"),
        ("train.lr=.nan", "-S train.lr=.nan: expected a number > 0"),
        ("train.lr=-0.1", "-S train.lr=-0.1: expected a number > 0"),
        ("train.precision=fp8", "-S train.precision=fp8: expected one of auto, fp32, bf16, fp16"),
        ("train.compile=yes please", "-S train.compile=yes please: expected true or false"),
        ("data.image_size=16", "-S data.image_size=16: expected an integer >= 32"),
        ("data.classes=[]", "-S data.classes=[]: expected a non-empty list of distinct non-empty names"),
        ("data.classes=[banana, banana]", "-S data.classes=[banana, banana]: expected a non-empty list of "
                                          "distinct non-empty names"),
        ("data.sha1=abc", "-S data.sha1=abc: expected 40 hex digits (or null)"),
        ("data.url=ftp://x", "-S data.url=ftp://x: expected an http(s) URL (or null)"),
        ("model.sizes=[[0.2]]", "-S model.sizes=[[0.2]]: expected 5 lists (one per scale) of equally many "
                                "numbers each > 0 and <= 1"),
        ("model.ratios=[1, 0]", "-S model.ratios=[1, 0]: expected a non-empty list of numbers each > 0"),
        ("evaluate.threshold=1.5", "-S evaluate.threshold=1.5: expected a number >= 0 and <= 1"),
        ("registry.model_name=a b", "-S registry.model_name=a b: expected a model name (letters, digits, _ . -)"),
        ("data.synthetic={seed: 1}", "-S data.synthetic={seed: 1}: data.synthetic.train is missing: "
                                     "expected an integer >= 1"),
        ("train=5", "-S train=5: expected a section with epochs, batch_size, lr, weight_decay, momentum, nproc, "
                    "precision, channels_last, compile, deterministic, num_workers, augment, lr_schedule, warmup_epochs, "
                    "recipe"),
        ("train.recipe=fast", "-S train.recipe=fast: expected one of book, photos"),
        ("train.lr=[1,", "-S train.lr=[1,: not valid YAML: expected the node content, but found '<stream end>'"),
    ])
    def test_refused_override_values(self, params_file, override, message):
        with pytest.raises(ValueError) as caught:
            load_params(params_file, [override])
        assert str(caught.value) == message

    @pytest.mark.parametrize("old, new, message", [
        ("epochs: 20", "epochs: abc", "train.epochs='abc': expected an integer >= 1"),
        ("epochs: 20", "epochs: 1.5", "train.epochs=1.5: expected an integer >= 1"),
        ("  lr: 0.2 ", "  lr: ", "train.lr=None: expected a number > 0"),
        ("  epochs: 20", "  epochs: 20\n  epoch: 5", "unknown key 'train.epoch': expected one of epochs, batch_size, "
         "lr, weight_decay, momentum, nproc, precision, channels_last, compile, deterministic, num_workers, augment, lr_schedule, warmup_epochs, recipe in train"),
        ("  epochs: 20\n", "", "train.epochs is missing: expected an integer >= 1"),
        ("base:\n  seed: 0\n", "", "base is missing: expected a section with seed"),
        ("registry:", "extra: 1\nregistry:", "unknown key 'extra': expected one of base, data, model, train, "
         "evaluate, registry in the top level"),
    ])
    def test_refused_file_values(self, params_file, old, new, message):
        with pytest.raises(ValueError) as caught:
            load_params(edited(params_file, old, new))
        assert str(caught.value) == f"{params_file}: {message}"

    def test_malformed_yaml_names_file_and_line(self, params_file):
        edited(params_file, "  lr: 0.2 ", "  lr: [0.2, ")
        with pytest.raises(ValueError) as caught:
            load_params(params_file)
        line = next(i for i, text in enumerate(params_file.read_text().splitlines(), 1) if "lr: [0.2" in text)
        assert re.fullmatch(rf"{re.escape(str(params_file))}:\d+:\d+: not valid YAML: .* started on line {line}\)",
                            str(caught.value))

    def test_an_override_can_repair_the_file(self, params_file):
        edited(params_file, "epochs: 20", "epochs: 1.5")
        assert load_params(params_file, ["train.epochs=2"])["train"]["epochs"] == 2

    def test_check_params_returns_its_input(self):
        params = load_params(PROJECT_PARAMS)
        assert check_params(params) is params


class TestSelectParams:
    def test_sections_and_keys(self):
        params = load_params(PROJECT_PARAMS)
        picked = select_params(params, ("train", "data.image_size", "data.synthetic"))
        assert picked == {"train": params["train"],
                          "data": {"image_size": params["data"]["image_size"], "synthetic": params["data"]["synthetic"]}}
        picked["train"]["epochs"] = 99
        assert params["train"]["epochs"] != 99  # a copy

    def test_undeclared_read_fails(self):
        with pytest.raises(KeyError):
            select_params(load_params(PROJECT_PARAMS), ("data.image_size",))["data"]["classes"]


class TestCli:
    """Every stage refuses bad params with one line on stderr and exit code 1, before doing anything."""

    @pytest.mark.parametrize("stage", STAGES)
    def test_bad_override(self, stage, params_file, capsys, monkeypatch):
        monkeypatch.chdir(params_file.parent)
        assert stage in COMMANDS
        assert cli_main([stage, "--params", str(params_file), "-S", "train.epochs=1.5"]) == 1
        err = capsys.readouterr().err
        assert err == f"ssd {stage}: error: -S train.epochs=1.5: expected an integer >= 1\n"
        assert sorted(p.name for p in params_file.parent.iterdir()) == ["params.yaml"]  # nothing written

    @pytest.mark.parametrize("stage", ["train", "validate"])
    def test_malformed_file_without_traceback(self, stage, params_file):
        edited(params_file, "  lr: 0.2 ", "  lr: [0.2, ")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SSD_DEBUG", None)
        run = subprocess.run([sys.executable, "-m", "ssd", stage, "-S", "train.lr="], cwd=params_file.parent,
                             capture_output=True, text=True, env=env)
        assert run.returncode == 1
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith(f"ssd {stage}: error: params.yaml:")


class TestBounds:
    def test_an_alias_bomb_is_refused_in_one_line_under_a_memory_limit(self, tmp_path):
        # 4 KB of nested aliases expands to ~10^12 list items if constructed; refused before that.
        lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
        bomb = tmp_path / "params.yaml"
        bomb.write_text(PROJECT_PARAMS.read_text().replace("classes: [banana]        #",
                                                           "classes: *a11        #", 1) + "\n".join(lines) + "\n")
        # the loader alone (torch's libraries alone map more address space than this limit allows)
        code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20)); "
                "from ssd.util.params import load_params\n"
                "try: load_params(sys.argv[1])\nexcept ValueError as e: sys.exit(str(e))")
        run = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and re.fullmatch(
            rf"{re.escape(str(bomb))}:\d+:\d+: not valid YAML: alias \*a\d+ refused \(params take no aliases\)",
            run.stderr.strip()), run.stderr

    def test_an_alias_in_an_override_is_refused(self, params_file):
        with pytest.raises(ValueError, match=r"alias \*x refused"):
            load_params(params_file, ["data.classes=*x"])

    def test_a_huge_params_file_is_refused_before_parsing(self, params_file):
        params_file.write_text(params_file.read_text() + "#" * (1 << 20) + "\n")
        with pytest.raises(ValueError, match=rf"^{re.escape(str(params_file))}: \d+ bytes: a params file is at most "
                                             r"1048576 bytes$"):
            load_params(params_file)
