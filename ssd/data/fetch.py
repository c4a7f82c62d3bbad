"""Fetch the banana dataset: download (or generate, or copy) it, verify it, unpack it, swap it in.

``fetch(source, sha1, out, data)`` is the one implementation; ``ssd fetch``, the DVC stage and the
Prefect flow call it. Sources (``ssd.data.source.source_kind``):

* ``d2l``: the real archive at ``data.url``, checked against ``data.sha1``;
* ``auto``: ``d2l`` when the network answers; when it is unreachable (DNS failure, refused or
  timed-out connection) the synthetic dataset instead, with a loud warning, recorded in the
  manifest. A checksum mismatch or an HTTP error is never a reason to fall back;
* ``synthetic``: generated bananas (``ssd.data.synthetic``), seeded by ``data.synthetic.seed``;
* an ``http(s)://`` or ``file://`` URL, or a path to a zip (``--sha1`` checked when given);
* a path to a dataset folder (``ssd.data.folder``), copied into the banana layout, so every later
  stage sees one layout; a symlink leading out of it refuses it (``ssd.data.confine``).

Every archive goes through the same verify + extract path (``ssd.data.archive``: absolute or ``..``
members, symlinks and zip bombs are refused). Everything is written inside a work folder beside
``out`` (``ssd.data.workdir``) whose new dataset replaces ``out`` whole on success (two renames): a
failure leaves the previous dataset, or nothing, never a partial one. ``out/manifest.json``
records what was fetched, and the source's fingerprint (``ssd.data.source``) when it describes it.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssd.data.archive import safe_extract
from ssd.data.download import NetworkUnreachable, download, url_name
from ssd.data.folder import check_layout, copy_folder, folder_splits
from ssd.data.layout import DATASET_DIR, MANIFEST
from ssd.data.source import file_identity, source_kind, tree_identity, warn
from ssd.data.workdir import remove_leftovers, work_prefix
from ssd.util.files import atomic_write_json, file_digest
from ssd.util.settings import DataSettings, SyntheticSettings


def _generate(work: Path, synth: SyntheticSettings, image_size: int, progress: bool) -> Path:
    from ssd.data.synthetic import generate_archive

    archive = work / "synthetic-banana-detection.zip"
    generate_archive(archive, seed=synth.seed, train=synth.train, val=synth.val, image_size=image_size,
                     max_objects=synth.max_objects, classes=synth.classes, progress=progress)
    return archive


# What a fingerprint's kind resolves to in the manifest: the fingerprint is recorded only when they agree.
_RESOLVES_TO = {"d2l": "d2l", "unreachable": "synthetic", "synthetic": "synthetic", "url": "url", "file": "file",
                "folder": "folder"}


@dataclass(frozen=True)
class _Request:
    """What one fetch was asked for, resolved against the settings before anything is written."""
    source: str
    kind: str                           # source_kind(source)
    sha1: str | None                    # --sha1 as given; d2l/auto default to data.sha1
    data: DataSettings                  # data.url and data.sha1 are read only for d2l/auto
    fingerprint: dict[str, Any] | None  # None unless it checked this very source
    progress: bool


@dataclass(frozen=True)
class _Obtained:
    """The archive (or folder) a source gave, its SHA-1 as computed and as expected (falsy: not
    checked), and the manifest fields saying where it came from."""
    archive: Path
    computed: str | None
    expected: str | None
    origin: dict[str, Any]


def _resolve(source: str | None, sha1: str | None, data: DataSettings, fingerprint: dict[str, Any] | None,
             progress: bool) -> _Request:
    source = source or data.source
    kind = source_kind(source)
    if kind == "folder" and sha1:
        raise ValueError(f"a SHA-1 checks an archive, and source {source!r} is a folder")
    if fingerprint is not None and fingerprint.get("source") != source:
        fingerprint = None  # a check of another source (a stale file, or `ssd fetch --source` by hand)
    return _Request(source, kind, sha1, data, fingerprint, progress)


def _obtain_synthetic(request: _Request, work: Path, fallback_reason: str | None = None) -> _Obtained:
    synth = request.data.synthetic
    archive = _generate(work, synth, request.data.image_size, request.progress)
    origin: dict[str, Any] = {"resolved_source": "synthetic"}
    if fallback_reason is not None:
        origin.update(synthetic_fallback=True, fallback_reason=fallback_reason)
    origin["synthetic"] = synth.as_dict()
    # A fallback's data were never asked for: the checksum given was the d2l archive's.
    expected = None if fallback_reason is not None else request.sha1
    return _Obtained(archive, file_digest(archive, "sha1"), expected, origin)


def _obtain_d2l(request: _Request, work: Path, out: Path) -> _Obtained:
    """The d2l archive; for ``auto``, generated data when the network is unreachable, unless the
    source check saw the URL answer (then the data would silently change kind: an error instead)."""
    url = request.data.url
    if not url:
        raise ValueError("params data.url is empty: no URL for the d2l archive")
    expected = request.sha1 or request.data.sha1
    archive = work / url_name(url)
    try:
        computed = download(url, archive, progress=request.progress)
    except NetworkUnreachable as exc:
        if request.kind != "auto" or (request.fingerprint or {}).get("kind") == "d2l":
            raise
        warn(f"{exc}.\nFalling back to the SYNTHETIC banana dataset (generated, not the real "
             f"one). Results will not be comparable with the book's. Recorded in {out / MANIFEST}.")
        return _obtain_synthetic(request, work, fallback_reason=str(exc))
    return _Obtained(archive, computed, expected, {"resolved_source": "d2l", "url": url})


def _obtain(request: _Request, work: Path, out: Path) -> _Obtained:
    """Bring the source into ``work`` (a folder or a local zip is read where it is)."""
    source, kind = request.source, request.kind
    if kind == "folder":
        return _Obtained(Path(source), None, request.sha1, {"resolved_source": "folder",
                                                            "path": str(Path(source).resolve())})
    if kind in ("auto", "d2l"):
        return _obtain_d2l(request, work, out)
    if kind == "synthetic":
        return _obtain_synthetic(request, work)
    if kind == "url":
        archive = work / (url_name(source) or "archive.zip")
        computed = download(source, archive, progress=request.progress)
        return _Obtained(archive, computed, request.sha1, {"resolved_source": "url", "url": source})
    path = Path(source)
    return _Obtained(path, file_digest(path, "sha1"), request.sha1, {"resolved_source": "file",
                                                                     "path": str(path.resolve())})


def _verify(request: _Request, got: _Obtained) -> dict[str, Any]:
    """Check the SHA-1 and that the source is still the one the source check saw; returns the
    manifest's identity fields. Runs before anything is unpacked, so a refusal writes nothing."""
    expected, computed, fingerprint = got.expected, got.computed, request.fingerprint
    if expected and computed.lower() != expected.lower():
        where = got.origin.get("url") or got.origin.get("path") or request.source
        raise ValueError(f"SHA-1 mismatch for {where}: expected {expected}, got {computed}; "
                         f"refusing it (the previous data is kept)")
    if request.kind == "folder":
        folder_splits(got.archive)  # refuse a folder in neither layout before hashing it
        identity, key = tree_identity(got.archive), "tree_sha256"
    else:
        identity, key = file_identity(got.archive), "sha256"
    if fingerprint and fingerprint.get(key) and fingerprint[key] != identity[key]:
        raise ValueError(f"{request.source} changed between the source check ({key} {fingerprint[key][:12]}…) "
                         f"and this fetch ({key} {identity[key][:12]}…): run the pipeline again")
    # Recorded only when it describes what was fetched: a check that failed, or that saw another
    # kind of source, must not let the next check call this data current.
    agrees = fingerprint is not None and not fingerprint.get("error") and \
        _RESOLVES_TO.get(fingerprint.get("kind", "")) == got.origin["resolved_source"]
    return {"sha1": computed, "expected_sha1": expected or None, "verified": bool(expected), key: identity[key],
            "source_bytes": identity["bytes"], "source_fingerprint": fingerprint if agrees else None}


def _unpack(request: _Request, got: _Obtained, new: Path) -> dict[str, Any]:
    """Extract (or copy a folder) into ``new`` in the banana layout; returns the manifest's counts."""
    if request.kind == "folder":
        counts: dict[str, Any] = {"copied_files": copy_folder(got.archive, new / DATASET_DIR)}
    else:
        new.mkdir()
        counts = {"extracted_files": safe_extract(got.archive, new)}
    return {**counts, "files": check_layout(new), "dataset": DATASET_DIR}


def _swap_in(new: Path, out: Path, old: Path) -> None:
    """Two renames: ``out`` is whole before and after, never a mix (``old`` goes with the work folder)."""
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)


def fetch(source: str | None, sha1: str | None, out: str | Path, data: DataSettings, *, progress: bool = True,
          fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fetch the dataset into ``out`` (``out/banana-detection/...`` and ``out/manifest.json``).

    ``source`` None: ``data.source``; ``sha1`` None: ``data.sha1`` for ``d2l`` and ``auto``, else
    unchecked. ``fingerprint``: the source's fingerprint from the `source` stage
    (``ssd.data.source.check_source``); it is recorded in the manifest as ``source_fingerprint`` when
    it describes what was fetched, so the next check can tell whether the data is still current. When
    it says the ``auto`` URL answered, failing to reach it now is an error, not a reason to fall back
    to generated data.

    A folder source (:func:`folder_splits`) is copied into the banana layout. Work folders of killed
    fetches beside ``out`` are removed first (:func:`remove_leftovers`).

    Returns the manifest. Raises ``ValueError`` (checksum mismatch, unsafe or malformed archive, a
    folder in neither layout or with a symlink out of it, a source that changed since the check), ``FileNotFoundError`` (missing
    zip) or ``RuntimeError`` (download failed); ``out`` is then untouched.
    """
    request = _resolve(source, sha1, data, fingerprint, progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in remove_leftovers(out.parent):
        print(f"removed {path}: left by a fetch that was killed", file=sys.stderr)
    manifest: dict[str, Any] = {"requested_source": request.source, "synthetic_fallback": False}

    # Beside `out`, so the final rename stays on one filesystem; `new` becomes `out`.
    with tempfile.TemporaryDirectory(prefix=work_prefix(), dir=out.parent) as work_dir:
        work, new = Path(work_dir), Path(work_dir) / "new"
        got = _obtain(request, work, out)
        manifest.update(got.origin)
        manifest.update(_verify(request, got))
        manifest.update(_unpack(request, got, new))
        atomic_write_json(new / MANIFEST, manifest)
        _swap_in(new, out, work / "old")
    return manifest
