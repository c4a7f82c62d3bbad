"""Reading ``params.yaml`` and applying ``key.sub=value`` overrides (as ``dvc exp run -S`` does)."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` as a float (YAML 1.2, as DVC reads it)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the params file and apply overrides like ``["train.epochs=5", "data.source=synthetic"]``.

    Override values are parsed as YAML (``5`` is an int, ``[1, 2]`` a list). An override must name
    an existing key, so a typo fails instead of being silently ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path} (run from the project root or pass --params)")
    params = _load_yaml(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return apply_overrides(params, overrides or [], source=str(path))


def apply_overrides(params: dict[str, Any], overrides: list[str], source: str = "params") -> dict[str, Any]:
    params = copy.deepcopy(params)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {source} has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: {source} has no key {key!r}")
        node[leaf] = _load_yaml(raw)
    return params
