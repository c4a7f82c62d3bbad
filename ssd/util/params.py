"""``params.yaml``: reading it, ``key.sub=value`` overrides (as ``dvc exp run -S``) and the one schema.

``load_params`` returns params that passed :data:`SCHEMA` (every key present, none unknown, every
value of its type and range), so stage code reads ``params["data"]["image_size"]`` with no default
and no cast. A refusal is one line naming the origin, the key, the value and what is expected:

    params.yaml: train.epochs='abc': expected an integer >= 1
    -S train.epochs=1.5: expected an integer >= 1

Adding a knob: its value (and comment) in ``params.yaml``, plus one line in :data:`SCHEMA`. The
defaults live in ``params.yaml`` only.

A stage declares the keys it reads (``PARAMS`` in its module, compared with ``dvc.yaml`` by
``tests/test_dvc_deps.py``) and sees only those (:func:`select_params`), so an undeclared read
fails in the tests instead of leaving a stale DVC stage.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class Check:
    """What one key accepts: ``ok(value)`` and the phrase for the error, "expected <expected>"."""

    expected: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo: int) -> Check:
    return Check(f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo)


def number(lo: float, hi: float | None = None, *, open_lo: bool = False) -> Check:
    """A finite int or float in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    low = f"> {lo}" if open_lo else f">= {lo}"
    text = f"a number {low}" + (f" and <= {hi}" if hi is not None else "")
    return Check(text, lambda v: _is_number(v) and (v > lo if open_lo else v >= lo) and (hi is None or v <= hi))


def boolean() -> Check:
    return Check("true or false", lambda v: isinstance(v, bool))


def one_of(*values: str) -> Check:
    return Check(f"one of {', '.join(values)}", lambda v: v in values)


def text(pattern: str = r".+", what: str = "a non-empty string", *, null: bool = False) -> Check:
    return Check(what + (" (or null)" if null else ""),
                 lambda v: (null and v is None) or (isinstance(v, str) and re.fullmatch(pattern, v) is not None))


def names() -> Check:
    return Check("a non-empty list of distinct non-empty names",
                 lambda v: isinstance(v, list) and len(v) > 0 and len(set(map(str, v))) == len(v)
                 and all(isinstance(n, str) and n.strip() for n in v))


def positive_numbers(hi: float | None = None) -> Check:
    """A non-empty list of numbers in ``(0, hi]``."""
    item = number(0, hi, open_lo=True)
    return Check("a non-empty list of numbers each " + item.expected.removeprefix("a number "),
                 lambda v: isinstance(v, list) and len(v) > 0 and all(map(item.ok, v)))


def anchor_sizes(scales: int) -> Check:
    """``scales`` lists of equally many sizes in ``(0, 1]`` (fractions of the image side)."""
    row = positive_numbers(1)
    return Check(f"{scales} lists (one per scale) of equally many numbers each > 0 and <= 1",
                 lambda v: isinstance(v, list) and len(v) == scales and all(map(row.ok, v))
                 and len({len(s) for s in v}) == 1)


# One line per key: the dotted key and what it accepts. Comments on the values live in params.yaml.
SCHEMA: dict[str, Check] = {
    "base.seed": integer(0),
    "data.source": text(),              # auto | d2l | synthetic | a URL | a zip path
    "data.url": text(r"https?://\S+", "an http(s) URL", null=True),
    "data.sha1": text(r"[0-9a-fA-F]{40}", "40 hex digits", null=True),
    "data.classes": names(),
    "data.image_size": integer(32),     # TinySSD halves the image 5 times before its last scale
    "data.strict": boolean(),
    "data.max_image_pixels": integer(1),
    "data.synthetic.seed": integer(0),
    "data.synthetic.train": integer(1),
    "data.synthetic.val": integer(1),
    "data.synthetic.max_objects": integer(1),
    "data.synthetic.classes": names(),
    "model.sizes": anchor_sizes(5),      # TinySSD's five scales
    "model.ratios": positive_numbers(),
    "train.epochs": integer(1),
    "train.batch_size": integer(1),
    "train.lr": number(0, open_lo=True),
    "train.weight_decay": number(0),
    "train.momentum": number(0, 1),
    "train.nproc": integer(1),
    "train.precision": one_of("auto", "fp32", "bf16", "fp16"),
    "train.channels_last": boolean(),
    "train.compile": boolean(),
    "train.deterministic": boolean(),
    "train.num_workers": integer(0),
    "train.augment": boolean(),
    "train.lr_schedule": one_of("constant", "cosine"),
    "train.warmup_epochs": number(0),       # at most train.epochs: checked by the train stage
    "evaluate.nms_threshold": number(0, 1),
    "evaluate.nms": one_of("agnostic", "per_class"),
    "evaluate.threshold": number(0, 1),
    "evaluate.gallery_images": integer(0),
    "registry.model_name": text(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "a model name (letters, digits, _ . -)"),
    "registry.min_improvement": number(0),
}


# ----------------------------------------------------------------------------------------------
# YAML

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` as a float (YAML 1.2, as DVC reads it)."""


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
