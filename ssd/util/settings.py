"""Typed settings: one frozen dataclass per ``params.yaml`` section, and what each key accepts.

This module is the one place for the params' schema: each field names its type and, in its
metadata, its :class:`Check` (range, allowed values). ``ssd.util.params`` reads ``params.yaml``,
applies ``-S`` overrides, checks every value against :data:`SCHEMA` (derived from these classes)
and builds a :class:`Settings`. The defaults live in ``params.yaml`` only: no field has one, so a
missing key is an error, never a silent default.

A stage declares the keys it reads (``PARAMS`` in its module; ``dvc.yaml`` lists the same, a test
compares) and gets settings in which every other key is *undeclared*: reading one raises
``AttributeError`` naming it, so an undeclared read fails in the stage's tests instead of leaving a
stale DVC stage.

Adding a knob: its value (and comment) in ``params.yaml``, plus one field here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

# Allowed values, named once: the schema checks them and the code that branches on them imports them.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
RECIPES = ("book", "photos")  # train.recipe; ssd.core.recipe says what each does
NMS_MODES = ("agnostic", "per_class")
LOADERS = ("auto", "memory", "stream")  # data.loader; ssd.data.dataset says what each does
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
SCALES = 5  # TinySSD's feature scales: model.sizes has one row per scale


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


def _key(check: Check) -> Any:
    return field(metadata={"check": check})


class _Section:
    """A settings section; a field the stage did not declare holds :class:`Undeclared` and raises."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if isinstance(value, Undeclared):
            raise AttributeError(f"param {value.key} is not among the params this stage declares (PARAMS)")
        return value

    def as_dict(self) -> dict[str, Any]:
        """The declared keys as plain YAML values (lists, not tuples): for logging and records."""
        out = {}
        for f in dataclasses.fields(self):
            value = object.__getattribute__(self, f.name)
            if not isinstance(value, Undeclared):
                out[f.name] = value.as_dict() if isinstance(value, _Section) else _plain(value)
        return out


@dataclass(frozen=True)
class Undeclared:
    key: str


@dataclass(frozen=True)
class BaseSettings(_Section):
    seed: int = _key(integer(0))


@dataclass(frozen=True)
class SyntheticSettings(_Section):
    seed: int = _key(integer(0))
    train: int = _key(integer(1))
    val: int = _key(integer(1))
    max_objects: int = _key(integer(1))
    classes: tuple[str, ...] = _key(names())


@dataclass(frozen=True)
class DataSettings(_Section):
    source: str = _key(text())  # auto | d2l | synthetic | a URL | a zip path | a folder
    url: str | None = _key(text(r"https?://\S+", "an http(s) URL", null=True))
    sha1: str | None = _key(text(r"[0-9a-fA-F]{40}", "40 hex digits", null=True))
    classes: tuple[str, ...] = _key(names())
    image_size: int = _key(integer(32))  # TinySSD halves the image 5 times before its last scale
    strict: bool = _key(boolean())
    max_image_pixels: int = _key(integer(1))
    max_boxes_per_image: int = _key(integer(1))
    max_label_line_bytes: int = _key(integer(64))  # a row of short names and numbers fits in 64 bytes
    max_label_rows: int = _key(integer(1))
    loader: str = _key(one_of(*LOADERS))
    synthetic: SyntheticSettings


@dataclass(frozen=True)
class ModelSettings(_Section):
    sizes: tuple[tuple[float, ...], ...] = _key(anchor_sizes(SCALES))
    ratios: tuple[float, ...] = _key(positive_numbers())


@dataclass(frozen=True)
class TrainSettings(_Section):
    epochs: int = _key(integer(1))
    batch_size: int = _key(integer(1))  # the global batch, split over the processes
    lr: float = _key(number(0, open_lo=True))
    weight_decay: float = _key(number(0))
    momentum: float = _key(number(0, 1))
    nproc: int = _key(integer(1))
    precision: str = _key(one_of(*PRECISIONS))
    channels_last: bool = _key(boolean())
    compile: bool = _key(boolean())
    deterministic: bool = _key(boolean())
    num_workers: int = _key(integer(0))
    augment: bool = _key(boolean())
    lr_schedule: str = _key(one_of(*LR_SCHEDULES))
    warmup_epochs: float = _key(number(0))  # at most train.epochs: checked by the train stage
    recipe: str = _key(one_of(*RECIPES))


@dataclass(frozen=True)
class EvaluateSettings(_Section):
    nms_threshold: float = _key(number(0, 1))
    nms: str = _key(one_of(*NMS_MODES))
    threshold: float = _key(number(0, 1))
    gallery_images: int = _key(integer(0))


@dataclass(frozen=True)
class RegistrySettings(_Section):
    model_name: str = _key(text(MODEL_NAME, "a model name (letters, digits, _ . -)"))
    min_improvement: float = _key(number(0))


@dataclass(frozen=True)
class Settings(_Section):
    """All of ``params.yaml``, section by section, in the file's order."""
    base: BaseSettings
    data: DataSettings
    model: ModelSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    registry: RegistrySettings

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Settings":
        """Settings from checked params (``ssd.util.params``); keys absent from ``params`` are undeclared."""
        return _build(cls, params, "")


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _section_type(f: dataclasses.Field) -> type | None:
    """The section class of a field that holds a section (annotations are strings here), else None."""
    return _SECTIONS.get(f.type if isinstance(f.type, str) else f.type.__name__)


def _build(cls: type, node: dict[str, Any], prefix: str) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        section = _section_type(f)
        if f.name not in node:
            values[f.name] = Undeclared(key)
        elif section is not None:
            values[f.name] = _build(section, node[f.name], key + ".")
        else:
            values[f.name] = _frozen(node[f.name])
    return cls(**values)


def _schema(cls: type, prefix: str = "") -> dict[str, Check]:
    out: dict[str, Check] = {}
    for f in dataclasses.fields(cls):
        section = _section_type(f)
        if section is not None:
            out.update(_schema(section, prefix + f.name + "."))
        else:
            out[prefix + f.name] = f.metadata["check"]
    return out


_SECTIONS = {c.__name__: c for c in (BaseSettings, SyntheticSettings, DataSettings, ModelSettings, TrainSettings,
                                     EvaluateSettings, RegistrySettings)}

# Every dotted key and what it accepts, in params.yaml's order.
SCHEMA: dict[str, Check] = _schema(Settings)
