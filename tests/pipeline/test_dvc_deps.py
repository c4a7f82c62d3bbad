"""dvc.yaml declares each stage's true dependencies, derived from the code (no DVC run needed).

Code: the module a stage's ``cmd`` runs (``ssd <command>``, mapped by ``ssd.cli.COMMANDS``; ``torchrun
... -m ssd train`` alike) and every package module it imports, transitively, function-level imports
included (read with ``ast``, nothing is imported). The stage must list exactly those ``ssd/*.py``.

Params: the module declares the keys its stage reads (``<COMMAND>_PARAMS``, else ``PARAMS``: a
tuple of sections like ``"train"`` or keys like ``"data.image_size"``) and the stage's code reads
``ssd.stages.common.settings(args, PARAMS)``, so a read outside the declaration fails in the
stage's own tests. Here the declaration must match the stage's ``params:`` in dvc.yaml.
"""
from __future__ import annotations

import ast
import re

import pytest
import yaml

from code_graph import PACKAGE, ROOT, code_deps, module_file, package_imports
from ssd.cli import COMMANDS
from ssd.util.params import SCHEMA

STAGES: dict = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_command(cmd: str) -> str | None:
    """The ``ssd`` subcommand a stage's ``cmd`` runs, or None."""
    match = re.search(r"(?:^|\s)ssd\s+([a-z]+)\b", cmd)
    return match.group(1) if match else None


def declared_params(command: str) -> tuple[str, ...] | None:
    """The ``<COMMAND>_PARAMS`` (else ``PARAMS``) tuple at the top level of the command's module."""
    tree = ast.parse(module_file(COMMANDS[command][0]).read_text())
    values = {target.id: node.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
              for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
              if isinstance(target, ast.Name)}
    for name in (f"{command.upper()}_PARAMS", "PARAMS"):
        if name in values:
            return tuple(ast.literal_eval(values[name]))
    return None


# ----------------------------------------------------------------------------------------------
# the checks (pure: a stage's dvc.yaml entry in, problems out)

def _covers(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + ".")


def code_problems(name: str, stage: dict) -> list[str]:
    command = stage_command(stage["cmd"])
    if command not in COMMANDS:
        return [f"stage {name!r}: cmd {stage['cmd']!r} runs no `ssd` command"]
    expected = code_deps(COMMANDS[command][0])
    listed = {d for d in stage.get("deps") or [] if isinstance(d, str) and d.startswith(f"{PACKAGE}/")}
    return [f"stage {name!r} misses dep {path} (imported by `ssd {command}`)" for path in sorted(expected - listed)] + \
        [f"stage {name!r} lists dep {path}, which `ssd {command}` does not import" for path in sorted(listed - expected)]


def params_problems(name: str, stage: dict) -> list[str]:
    command = stage_command(stage["cmd"])
    declared = declared_params(command)
    if declared is None:
        return [f"stage {name!r}: {module_file(COMMANDS[command][0]).relative_to(ROOT)} declares no PARAMS"]
    listed = [p for p in stage.get("params") or [] if isinstance(p, str)]
    unknown = [k for k in declared if not any(_covers(k, s) for s in SCHEMA)]
    missing = [k for k in declared if not any(_covers(p, k) for p in listed)]
    extra = [p for p in listed if not any(_covers(p, k) or _covers(k, p) for k in declared)]
    return [f"stage {name!r}: `ssd {command}` declares {k!r}, which is not in the params schema" for k in unknown] + \
        [f"stage {name!r} misses param {k} (read by `ssd {command}`)" for k in missing] + \
        [f"stage {name!r} lists param {p}, which `ssd {command}` does not read" for p in extra]


# ----------------------------------------------------------------------------------------------
# the tests

@pytest.mark.parametrize("name", STAGES)
def test_stage_lists_the_modules_its_command_imports(name):
    problems = code_problems(name, STAGES[name])
    assert not problems, "dvc.yaml: " + "; ".join(problems)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_lists_the_params_its_code_reads(name):
    problems = params_problems(name, STAGES[name])
    assert not problems, "dvc.yaml: " + "; ".join(problems)


def test_every_stage_runs_an_ssd_command():
    assert {name: stage_command(stage["cmd"]) for name, stage in STAGES.items()} == {
        "source": "source", "fetch": "fetch", "validate": "validate", "train": "train", "evaluate": "evaluate",
        "register": "register"}


def test_the_checks_can_fail():
    evaluate = {**STAGES["evaluate"], "deps": [d for d in STAGES["evaluate"]["deps"] if d != "ssd/core/model.py"]}
    assert code_problems("evaluate", evaluate) == [
        "stage 'evaluate' misses dep ssd/core/model.py (imported by `ssd evaluate`)"]
    register = {**STAGES["register"], "deps": [*STAGES["register"]["deps"], "ssd/engine/loop.py"],
                "params": ["registry", "data.source"]}
    assert code_problems("register", register) == [
        "stage 'register' lists dep ssd/engine/loop.py, which `ssd register` does not import"]
    assert params_problems("register", register) == [
        "stage 'register' misses param evaluate.threshold (read by `ssd register`)",
        "stage 'register' misses param evaluate.nms_threshold (read by `ssd register`)",
        "stage 'register' misses param evaluate.nms (read by `ssd register`)",
        "stage 'register' misses param data.image_size (read by `ssd register`)",
        "stage 'register' misses param data.max_image_pixels (read by `ssd register`)",
        "stage 'register' misses param data.classes (read by `ssd register`)",
        "stage 'register' misses param data.max_boxes_per_image (read by `ssd register`)",
        "stage 'register' misses param data.max_label_line_bytes (read by `ssd register`)",
        "stage 'register' misses param data.max_label_rows (read by `ssd register`)",
        "stage 'register' lists param data.source, which `ssd register` does not read"]


def test_imports_are_followed_into_functions_and_relative_forms():
    # registry imports evaluation's scoring inside a function; the package's __main__ imports the cli relatively
    assert "ssd.engine.evaluation" in package_imports("ssd.mlops.registry")
    assert package_imports("ssd.__main__") == {"ssd.cli"}
    assert {"ssd/engine/evaluation.py", "ssd/core/model.py", "ssd/core/boxes.py", "ssd/data/layout.py"} <= \
        code_deps("ssd.mlops.registry")


def test_shims_import_only_the_cli():
    assert package_imports("ssd") <= {"ssd.cli"} and package_imports("ssd.__main__") <= {"ssd.cli"}
