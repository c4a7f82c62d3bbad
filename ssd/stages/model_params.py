"""Params of a stage that runs a given model (``ssd predict``, ``ssd evaluate``): the model's settings win.

A model says some things about itself (``ssd.mlops.models.StoredModel.settings``, as params keys): a
model file its classes and the image size it was trained at; a registered model also its NMS
threshold (and mode, when registered with it), score threshold and image limit. Each key a stage
declares gets, first found:

1. an explicit value: ``-S key=value``, or a ``--params FILE`` other than the default ``params.yaml``;
2. the model's;
3. ``params.yaml`` in the current folder, when there is one (not named: the default);
4. :data:`FALLBACKS`: params.yaml's own values, so that ``ssd predict`` works outside a checkout.

A key the model fixes (:data:`BOUND`: it was trained or registered with it) given explicitly with
another value is refused in one line naming the param, both values and the model; when only the
default ``params.yaml`` differs, the model's value is used and a note says so. The other keys the
model only suggests (``evaluate.threshold``, ``data.max_image_pixels``): an explicit value wins.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS
from ssd.engine.inference import DEFAULT_IMAGE_SIZE, DEFAULT_NMS_THRESHOLD, DEFAULT_THRESHOLD, PER_CLASS_NMS, Detector
from ssd.mlops.models import DEFAULT_MODEL_NAME, open_model
from ssd.mlops.records import CHAMPION, alias_uri
from ssd.util.params import DEFAULT_PARAMS, load_params, parse_yaml
from ssd.util.settings import NMS_MODES, SCHEMA, Settings

BOUND = ("data.image_size", "data.classes", "evaluate.nms_threshold", "evaluate.nms")
FALLBACKS: dict[str, Any] = {
    "data.image_size": DEFAULT_IMAGE_SIZE, "data.max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
    "evaluate.threshold": DEFAULT_THRESHOLD, "evaluate.nms_threshold": DEFAULT_NMS_THRESHOLD,
    "evaluate.nms": NMS_MODES[0], "registry.model_name": DEFAULT_MODEL_NAME}


@dataclass(frozen=True)
class GivenParams:
    """The params a command line gives, by dotted key."""
    explicit: dict[str, Any]   # -S, or a --params file named on the command line
    origins: dict[str, str]    # where each explicit value came from ("-S k=v" or the file)
    implicit: dict[str, Any]   # ./params.yaml, not named
    file: str                  # the params file looked for


def open_detector(args: argparse.Namespace, keys: Iterable[str], command: str,
                  device: str | None = None, model: str | None = None) -> tuple[Detector, Settings]:
    """The model ``model`` (default ``args.model``, else ``registry.model_name``'s champion) as a detector
    with its own settings, and the settings of ``keys`` resolved against it; notes go to stderr."""
    given = given_params(args, keys)  # a bad param is reported before any model is fetched
    model = model or args.model or alias_uri(value(given, "registry.model_name"), CHAMPION)
    stored = open_model(model, device)
    settings, notes = resolve(given, keys, stored.settings, model)
    for note in notes:
        print(f"ssd {command}: note: {note}", file=sys.stderr)
    evaluate = settings.evaluate
    detector = Detector(stored.net, settings.data.image_size, evaluate.nms_threshold, evaluate.nms == PER_CLASS_NMS,
                        stored.source)
    return detector, settings


def flat_keys(keys: Iterable[str]) -> list[str]:
    """A stage's PARAMS (sections or dotted keys) as the dotted keys of :data:`SCHEMA`."""
    out: list[str] = []
    for key in keys:
        out += [k for k in SCHEMA if k == key or k.startswith(key + ".")]
    return out


def given_params(args: argparse.Namespace, keys: Iterable[str]) -> GivenParams:
    """What ``--params`` and ``-S`` say about ``keys``; no params file is needed unless one is named."""
    keys, named = flat_keys(keys), args.params != str(DEFAULT_PARAMS)
    set_by = {item.partition("=")[0]: item for item in args.set}
    path = Path(args.params)
    if named or path.is_file():
        params = load_params(path, args.set)  # checked; a named file that is missing: FileNotFoundError
        values = {key: _get(params, key) for key in keys}
        origin = {key: next((f"-S {set_by[p]}" for p in _prefixes(key) if p in set_by), args.params) for key in keys}
        explicit = {k: v for k, v in values.items() if named or origin[k] != args.params}
        return GivenParams(explicit, {k: origin[k] for k in explicit},
                           {k: v for k, v in values.items() if k not in explicit}, args.params)
    overrides = {key: _override(key, item) for key, item in set_by.items()}
    explicit = {k: v for k, v in overrides.items() if k in keys}
    return GivenParams(explicit, {k: f"-S {set_by[k]}" for k in explicit}, {}, args.params)


def value(given: GivenParams, key: str) -> Any:
    """``key`` from the params given, else its fallback (no model involved)."""
    for source in (given.explicit, given.implicit, FALLBACKS):
        if key in source:
            return source[key]
    raise FileNotFoundError(f"params file not found: {given.file} (run from the project root or pass --params)")


def resolve(given: GivenParams, keys: Iterable[str], model: dict[str, Any],
            where: str) -> tuple[Settings, list[str]]:
    """Typed settings of ``keys`` with the model's values (``model``, of the model named ``where``)
    applied as the module docstring says, and the notes to show (params.yaml values not used)."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    for key in flat_keys(keys):
        own = model.get(key)
        if key in given.explicit:
            if key in BOUND and own is not None and not _same(given.explicit[key], own):
                raise ValueError(f"{given.origins[key]}: {key}={_show(given.explicit[key])} contradicts the model: "
                                 f"{where} has {key}={_show(own)} (drop the param, or use another model)")
            values[key] = given.explicit[key]
        elif own is not None:
            if key in BOUND and key in given.implicit and not _same(given.implicit[key], own):
                notes.append(f"{key}={_show(own)} from the model ({where}), not {given.file}'s {_show(given.implicit[key])}")
            values[key] = own
        else:
            values[key] = value(given, key)
    return Settings.from_params(_nest(values)), notes


def _override(key: str, item: str) -> Any:
    """One ``-S key=value`` without a params file: the key must exist and the value pass its check."""
    if key not in SCHEMA:
        raise ValueError(f"override {item!r}: no params key {key!r}")
    parsed = parse_yaml(item.partition("=")[2], f"-S {item}", position=False)
    if not SCHEMA[key].ok(parsed):
        raise ValueError(f"-S {item}: expected {SCHEMA[key].expected}")
    return parsed


def _get(params: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        params = params[part]
    return params


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = val
    return out


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _same(a: Any, b: Any) -> bool:
    return _plain(a) == _plain(b)


def _show(v: Any) -> str:
    return repr(_plain(v))
