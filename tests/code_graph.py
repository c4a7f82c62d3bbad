"""The package's import graph, read from the source with ``ast`` (nothing is imported): which package
modules a module imports (function-level imports included, ``if TYPE_CHECKING:`` blocks left out) and
what a command needs transitively. tests/pipeline/test_dvc_deps.py and test_layers.py check dvc.yaml
and the floors with it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ssd"
# Entry shims every command passes through; they hold no logic (test_shims_import_only_the_cli).
SHIMS = {"ssd/__init__.py", "ssd/__main__.py"}


def module_file(module: str) -> Path | None:
    """``ssd.x`` -> ``ssd/x.py`` (or a subpackage's ``__init__.py``); None outside the package."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def package_imports(module: str) -> set[str]:
    """The package modules that ``module``'s source imports anywhere (functions included)."""
    path = module_file(module)
    is_package = path.name == "__init__.py"
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, `level - 1` packages up
                parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from ssd import x` imports the module ssd.x
                found.add(f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}") else base)
    return {m for m in found if module_file(m) is not None}


def code_deps(module: str) -> set[str]:
    """``module`` and everything in the package it imports, transitively, as repository paths."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(package_imports(current) - seen)
    return {module_file(m).relative_to(ROOT).as_posix() for m in seen} - SHIMS
