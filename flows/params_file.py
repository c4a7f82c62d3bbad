"""The flow's params overrides, written into ``params.yaml`` like ``dvc exp run -S`` (comments kept)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ssd.util.files import atomic_write_text
from ssd.util.params import apply_overrides, check_params, parse_yaml


def flow_overrides(overrides: list[str] | None, nproc: int | None, source: str | None) -> list[str]:
    """The flow's params overrides: ``overrides`` then the shorthands (which win)."""
    items = list(overrides or [])
    if nproc is not None:
        if int(nproc) < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        items.append(f"train.nproc={int(nproc)}")
    if source:
        items.append(f"data.source={json.dumps(source)}")  # quoted: a source is a string, whatever it looks like
    return items


def write_params(path: str | Path, overrides: list[str]) -> list[str]:
    """Apply ``key.sub=value`` overrides to the params file in place, keeping its comments.

    ``ssd.util.params.apply_overrides`` checks the keys and parses the values, and the result must pass
    the params schema (one implementation for the CLI and the flow: a bad value fails here, before
    any stage runs, and the file is left as it was); only the overridden keys are then set in a
    round-trip copy of the file, which is written atomically. Returns the overrides that changed
    something (the file is not touched when none did).
    """
    from ruamel.yaml import YAML

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    text = path.read_text()
    old = parse_yaml(text, str(path)) or {}
    new = check_params(apply_overrides(old, overrides, source=str(path)), str(path), overrides)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(text)
    changed = []
    for item in overrides:
        *parents, leaf = item.partition("=")[0].split(".")
        src, before, dst = new, old, doc
        for part in parents:
            src, before, dst = src[part], before[part], dst[part]
        if before[leaf] != src[leaf] and item not in changed:
            dst[leaf] = src[leaf]
            changed.append(item)
    if changed:
        buffer = io.StringIO()
        rt.dump(doc, buffer)
        atomic_write_text(path, buffer.getvalue())
    return changed
