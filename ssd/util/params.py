"""``params.yaml``: reading it, ``key.sub=value`` overrides (as ``dvc exp run -S``) and checking it.

``load_params`` returns params that passed :data:`SCHEMA` (``ssd.util.settings``: every key present,
none unknown, every value of its type and range); :func:`load_settings` turns them into typed
:class:`~ssd.util.settings.Settings`, narrowed to the keys a stage declares. A refusal is one line
naming the origin, the key, the value and what is expected:

    params.yaml: train.epochs='abc': expected an integer >= 1
    -S train.epochs=1.5: expected an integer >= 1
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from ssd.util.settings import SCHEMA, Settings

DEFAULT_PARAMS = Path("params.yaml")


# ----------------------------------------------------------------------------------------------
# YAML

MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KB; a larger one is not a params file


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` as a float (YAML 1.2, as DVC reads it) and
    refuses aliases: params need none, and nested aliases expand a few KB into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} refused (params take no aliases)",
                                              event.start_mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def parse_yaml(text: str, origin: str, *, position: bool = True) -> Any:
    """``text`` as YAML; a syntax error is a one-line ``ValueError`` naming ``origin`` (and, with
    ``position``, its line and column)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if position and mark is not None else origin
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if position and context and start is not None and mark is not None and start.line != mark.line:
            problem += f" ({context} started on line {start.line + 1})"
        raise ValueError(f"{where}: not valid YAML: {problem}") from None


# ----------------------------------------------------------------------------------------------
# loading and checking

def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the params file, apply overrides like ``["train.epochs=5", "data.source=synthetic"]`` and
    check the result against :data:`SCHEMA`.

    Override values are parsed as YAML (``5`` is an int, ``[1, 2]`` a list). An override must name
    an existing key, so a typo fails instead of being silently ignored. Raises ``FileNotFoundError``
    or a one-line ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path} (run from the project root or pass --params)")
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ValueError(f"{path}: {size} bytes: a params file is at most {MAX_PARAMS_BYTES} bytes")
    params = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    overrides = overrides or []
    return check_params(apply_overrides(params, overrides, source=str(path)), str(path), overrides)


def apply_overrides(params: dict[str, Any], overrides: list[str], source: str = "params") -> dict[str, Any]:
    """A copy of ``params`` with ``key.sub=value`` items applied (keys must exist; values are YAML)."""
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
        node[leaf] = parse_yaml(raw, f"-S {item}", position=False)
    return params


def check_params(params: dict[str, Any], source: str = str(DEFAULT_PARAMS),
                 overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``params`` itself if it matches :data:`SCHEMA` exactly, else a one-line ``ValueError``.

    The error names ``source`` (the file) or, for a key set by one of ``overrides``, that override.
    """
    given = {item.partition("=")[0]: item for item in overrides}

    def refuse(key: str, what: str, expected: str) -> ValueError:
        """``what``: ``key=value``, ``key is missing`` or ``unknown key 'key'``."""
        if key in given and what.startswith(f"{key}="):  # the value typed after -S: name it as typed
            return ValueError(f"-S {given[key]}: {expected}")
        origin = next((f"-S {given[p]}" for p in _prefixes(key) if p in given), source)
        return ValueError(f"{origin}: {what}: {expected}")

    def expected(path: str) -> str:
        return SCHEMA[path].expected if path in SCHEMA else f"a section with {', '.join(_children(path))}"

    def walk(node: Any, path: str) -> None:
        if path in SCHEMA:
            if not SCHEMA[path].ok(node):
                raise refuse(path, f"{path}={node!r}", f"expected {expected(path)}")
            return
        if not isinstance(node, dict):
            raise refuse(path, f"{path}={node!r}", f"expected {expected(path)}")
        children = _children(path)
        for name, value in node.items():
            key = f"{path}.{name}" if path else str(name)
            if str(name) not in children:
                raise refuse(key, f"unknown key {key!r}", f"expected one of {', '.join(children)}"
                                                          f" in {path or 'the top level'}")
            walk(value, key)
        for name in children:
            key = f"{path}.{name}" if path else name
            if name not in node:
                raise refuse(key, f"{key} is missing", f"expected {expected(key)}")

    walk(params, "")
    return params


def load_settings(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None,
                  keys: Iterable[str] | None = None) -> Settings:
    """:func:`load_params` as typed settings; with ``keys`` (a stage's ``PARAMS``), every other key is
    undeclared (reading it raises ``AttributeError``)."""
    params = load_params(path, overrides)
    return Settings.from_params(params if keys is None else select_params(params, keys))


def select_params(params: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """Only ``keys`` of ``params``: sections (``"train"``) or dotted keys (``"data.image_size"``).

    A stage works on this selection of its declared ``PARAMS``, so reading an undeclared key is a
    ``KeyError`` in its tests rather than a ``dvc.yaml`` that misses a dependency.
    """
    out: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = params, out
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = copy.deepcopy(src[leaf])
    return out


def _prefixes(key: str) -> list[str]:
    """``a.b.c`` -> ``["a.b.c", "a.b", "a"]``."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _children(path: str) -> list[str]:
    """The names directly under section ``path`` ("" is the top level), in schema order."""
    depth = path.count(".") + 1 if path else 0
    prefix = f"{path}." if path else ""
    return list(dict.fromkeys(k.split(".")[depth] for k in SCHEMA if k.startswith(prefix)))
