"""Where a run, a model version or a report came from: git commit, DVC's hash of the data, its source.

The same keys (:data:`PROVENANCE_KEYS`), all strings, on the training run's tags, the model
version's tags and in the reports' ``provenance`` block: :func:`provenance` computes them from the
checkout and the data on disk, :func:`run_provenance` reads them back from a run's tags.
:func:`split_digest` names a validation split by content, so the registry can tell whether two
scores are comparable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ssd.util.files import file_digest

PROVENANCE_KEYS = ("git_commit", "git_dirty", "data_hash", "data_source", "data_synthetic_fallback")
_MD5_CACHE: dict[tuple[str, int, int, int, int], str] = {}


def data_folder(dataset_root: str | Path) -> Path:
    """The folder that identifies a dataset: ``data/raw`` (the fetch stage's output, as DVC tracks
    it, ``manifest.json`` included) for ``data/raw/banana-detection``, else the dataset root itself."""
    root = Path(dataset_root)
    return root.parent if (root.parent / "manifest.json").is_file() else root


def _file_md5(path: Path) -> str:
    # A file seen unchanged is not read again. The change time is in the key because every write sets
    # it, also one that puts the old mtime back (`touch -r`): a same-size edit is not missed.
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _MD5_CACHE:
        _MD5_CACHE[key] = file_digest(path, "md5")
    return _MD5_CACHE[key]


def dvc_md5(directory: str | Path) -> dict[str, str]:
    """DVC's md5 of ``directory`` and of every folder in it, keyed by POSIX path relative to it
    (``"."`` for itself): ``<md5>.dir``, what ``dvc add`` and ``dvc.lock`` record (DVC 3). Empty if
    ``directory`` does not exist."""
    directory = Path(directory)
    files = sorted((p.relative_to(directory).as_posix(), _file_md5(p))
                   for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else []
    listings: dict[str, list[dict[str, str]]] = {}
    for rel, md5 in files:  # sorted by path, so every folder's listing is too, as DVC sorts it
        for parent in Path(rel).parents:
            folder = parent.as_posix()
            listings.setdefault(folder, []).append(
                {"md5": md5, "relpath": rel if folder == "." else rel[len(folder) + 1:]})
    return {folder: hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
            for folder, listing in listings.items()}


def split_digest(split_dir: str | Path) -> str:
    """``dvc-md5:<md5>.dir``: DVC's hash of one split's folder (images and label file), the digest its
    MLflow dataset input carries. Equal digests mean the same images and boxes, so the same model
    scores the same on both; the registry uses it to tell whether two scores are comparable."""
    digest = dvc_md5(split_dir).get(".")
    if digest is None:
        raise FileNotFoundError(f"{split_dir}: no such split folder (or it is empty)")
    return f"dvc-md5:{digest}"


def read_manifest(folder: Path) -> dict[str, Any]:
    """``ssd fetch``'s ``manifest.json`` in ``folder``; empty when there is none (data from elsewhere)."""
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def data_source(manifest: dict[str, Any], folder: Path) -> str:
    """Where the data came from: the archive's URL or path from ``ssd fetch``'s manifest,
    ``synthetic:seed=N`` for generated bananas, else the folder it was read from."""
    if manifest.get("resolved_source") == "synthetic":
        return f"synthetic:seed={(manifest.get('synthetic') or {}).get('seed', 'unknown')}"
    return str(manifest.get("url") or manifest.get("path") or folder.resolve())


def _git(cwd: str | Path, *args: str) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _pipeline_outputs(cwd: str | Path) -> list[str]:
    """``dvc.lock``, ``params.yaml`` and every ``outs``/``metrics``/``plots`` path of ``dvc.yaml``'s
    stages: files the pipeline itself writes, some of them committed to git. ``params.yaml`` is among
    them because ``dvc exp run -S`` and the flow write it before any stage runs; the values are
    recorded as the run's params, so they need no dirty flag."""
    import yaml

    try:
        stages = (yaml.safe_load((Path(cwd) / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        stages = {}
    return ["dvc.lock", "params.yaml"] + [str(next(iter(entry)) if isinstance(entry, dict) else entry)
                           for stage in stages.values() if isinstance(stage, dict)
                           for key in ("outs", "metrics", "plots") for entry in stage.get(key) or []]


def provenance(dataset_root: str | Path, cwd: str | Path = ".") -> dict[str, str]:
    """Where a run, a model version or a report came from; the same keys (``PROVENANCE_KEYS``),
    all strings, on run tags, version tags and in the reports' ``provenance`` block:

    - ``git_commit``: the checked-out commit (``unknown`` outside git);
    - ``git_dirty``: ``true`` when tracked files differ from it, the pipeline's own outputs aside
      (``dvc.lock`` and the reports, rewritten as each stage of ``dvc repro`` finishes) and
      ``params.yaml`` (logged as the run's params), else
      ``false`` (``unknown`` outside git);
    - ``data_hash``: ``dvc-md5:<md5>.dir``, DVC's hash of :func:`data_folder`, computed from the
      files on disk (equal to ``dvc.lock``'s when that is up to date), ``unknown`` without data;
    - ``data_source``: :func:`data_source`;
    - ``data_synthetic_fallback``: ``true`` when ``ssd fetch --source auto`` generated bananas
      because the network was unreachable, else ``false``.
    """
    folder = data_folder(dataset_root)
    manifest = read_manifest(folder)
    commit = _git(cwd, "rev-parse", "HEAD")
    dirty = _git(cwd, "status", "--porcelain", "--untracked-files=no", "--", ":/",
                 *(f":(exclude){path}" for path in _pipeline_outputs(cwd)))
    data_hash = dvc_md5(folder).get(".")
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if commit is None or dirty is None else str(bool(dirty)).lower(),
            "data_hash": f"dvc-md5:{data_hash}" if data_hash else "unknown",
            "data_source": data_source(manifest, folder),
            "data_synthetic_fallback": str(bool(manifest.get("synthetic_fallback"))).lower()}


def run_provenance(tags: dict[str, str]) -> dict[str, str]:
    """The :func:`provenance` a run was tagged with (``unknown`` for a key it lacks)."""
    return {key: tags.get(key, "unknown") for key in PROVENANCE_KEYS}
