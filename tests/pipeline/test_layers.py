"""The package's floors: each module imports only from its own floor or those below, and no cycle.

    util < core < data < engine < mlops < stages < cli

Read from the source with ``ast`` (function-level imports included; nothing is imported), as
``tests/pipeline/test_dvc_deps.py`` reads a stage's dependencies.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from code_graph import ROOT, package_imports

FLOORS = ("util", "core", "data", "engine", "mlops", "stages", "cli")


def modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / "ssd").rglob("*.py"))


def floor(module: str) -> int | None:
    """The floor of ``ssd.<floor>[.x]``; None for the package's own shims (``ssd``, ``ssd.__main__``)."""
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def upward_imports(module: str) -> list[str]:
    here = floor(module)
    if here is None:
        return []
    return sorted(f"{module} imports {other} (floor {FLOORS[floor(other)]} is above {FLOORS[here]})"
                  for other in package_imports(module) if floor(other) is not None and floor(other) > here)


def cycles() -> list[list[str]]:
    graph = {m: sorted(package_imports(m)) for m in modules()}
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    return found


def test_every_module_sits_on_a_floor():
    assert [m for m in modules() if floor(m) is None] == ["ssd", "ssd.__main__"]


@pytest.mark.parametrize("module", modules())
def test_no_upward_import(module):
    assert upward_imports(module) == []


def test_no_import_cycle():
    assert cycles() == []


def test_util_and_the_cli_import_without_torch():
    # the ground floor and the entry point stay cheap to import (the flow, `ssd --help`)
    names = [m for m in modules() if floor(m) == 0] + ["ssd.cli"]
    code = f"import sys; import {', '.join(names)}; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_checks_can_fail(tmp_path, monkeypatch):
    assert floor("ssd.core.boxes") < floor("ssd.engine.loop")
    monkeypatch.setattr("test_layers.package_imports", lambda m: {"ssd.engine.loop"} if m == "ssd.core.boxes" else set())
    assert upward_imports("ssd.core.boxes") == [
        "ssd.core.boxes imports ssd.engine.loop (floor engine is above core)"]
    graph = {"ssd.core.a": {"ssd.core.b"}, "ssd.core.b": {"ssd.core.a"}}
    monkeypatch.setattr("test_layers.modules", lambda: sorted(graph))
    monkeypatch.setattr("test_layers.package_imports", lambda m: graph[m])
    assert cycles() == [["ssd.core.a", "ssd.core.b", "ssd.core.a"]]
