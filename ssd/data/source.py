"""What a data source names, and its fingerprint: the `source` stage, always run before fetch.

:func:`check_source` writes a small fingerprint of the source to its output file, only when it
changed: the zip's SHA-256, a folder's tree hash, a URL's ETag/Last-Modified/Content-Length from a
HEAD request (its body's SHA-256 when the server gives neither), the generator's settings, or
``unreachable`` for ``auto`` offline. Fetch depends on that file, so DVC reruns it exactly when the
source changed, and records it in the manifest; :func:`fetch_reason` then says why data was fetched.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ssd.data.confine import source_files
from ssd.data.download import CONNECT_TIMEOUT, RETRIES, HTTPStatusError, NetworkUnreachable, hash_body, head
from ssd.data.layout import MANIFEST
from ssd.util.files import atomic_write_json, file_digest
from ssd.util.settings import DataSettings

HEAD_REFUSED = {403, 405, 501}  # servers that refuse HEAD but serve GET (e.g. URLs presigned for GET)


def warn(message: str) -> None:
    """A warning no one scrolling a log can miss."""
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def source_kind(source: str) -> str:
    """What ``source`` names: ``auto``, ``d2l``, ``synthetic``, ``url`` (http, https or file), ``file``
    (a zip) or ``folder``; ``FileNotFoundError`` for anything else."""
    if source in ("auto", "d2l", "synthetic"):
        return source
    if urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
        return "url"
    path = Path(source)
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    raise FileNotFoundError(f"source {source!r} is not auto, d2l, synthetic, a URL or an existing zip file or folder")


def file_identity(path: Path) -> dict[str, Any]:
    """``sha256`` and ``bytes`` of a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source file not found: {path}")
    return {"sha256": file_digest(path), "bytes": path.stat().st_size}


def tree_identity(root: Path) -> dict[str, Any]:
    """``tree_sha256`` over every file's relative path and SHA-256 under ``root``, with ``files`` and ``bytes``.

    ``ValueError`` naming the first symlink that leads outside ``root`` (``ssd.data.confine``): what
    is hashed is what fetch may copy, and nothing outside the folder is read."""
    root = Path(os.path.realpath(root))
    digest, files, size = hashlib.sha256(), 0, 0
    for path in sorted(source_files(root), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + bytes.fromhex(file_digest(path)))
        files, size = files + 1, size + path.stat().st_size
    return {"tree_sha256": digest.hexdigest(), "files": files, "bytes": size}


def probe_url(url: str, *, timeout: float = CONNECT_TIMEOUT, retries: int = RETRIES,
              backoff: float = 1.0) -> dict[str, Any]:
    """What identifies the archive at ``url`` now, cheaply.

    A HEAD request's ``etag``, ``last_modified`` and ``content_length``; when the server sends
    neither validator or refuses HEAD, the ``sha256`` and ``bytes`` of the body (streamed, nothing
    written). A ``file://`` URL is hashed (its mtime is too coarse to trust). Errors as
    :func:`ssd.data.download.download`.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return file_identity(Path(urllib.request.url2pathname(parsed.path)))
    headers = head(url, HEAD_REFUSED, timeout=timeout, retries=retries, backoff=backoff)
    if headers is not None and (headers.get("ETag") or headers.get("Last-Modified")):
        length = headers.get("Content-Length")
        # Content-Length alone would miss a same-size replacement, so it only ever adds to a validator.
        return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                "content_length": int(length) if length and length.isdigit() else None}
    return hash_body(url, timeout=timeout, retries=retries, backoff=backoff)


def _url_fingerprint(source: str, kind: str, url: str, generated: dict[str, Any], previous: dict[str, Any] | None,
                     probe: dict[str, Any]) -> dict[str, Any]:
    """:func:`source_fingerprint` of a URL (``kind`` ``url``, ``d2l`` or ``auto``)."""
    resolved = "url" if kind == "url" else "d2l"
    try:
        return {"source": source, "kind": resolved, "url": url, **probe_url(url, **probe)}
    except HTTPStatusError as exc:
        return {"source": source, "kind": resolved, "url": url, "error": f"HTTP {exc.code}"}
    except (NetworkUnreachable, RuntimeError) as exc:
        unreachable = isinstance(exc, NetworkUnreachable)
        if (previous and previous.get("source") == source and previous.get("kind") == resolved
                and previous.get("url") == url and not previous.get("error")):
            warn(f"{exc}.\nCannot tell whether {url} changed: keeping the fingerprint of the data fetched "
                 f"from it before, so fetch does not run again (and does not fall back to generated data).")
            return previous
        if kind == "auto" and unreachable:
            return {"source": source, "kind": "unreachable", "url": url, **generated}
        return {"source": source, "kind": resolved, "url": url,
                "error": "unreachable" if unreachable else "no answer after retries"}


def source_fingerprint(source: str | None, data: DataSettings,
                       previous: dict[str, Any] | None = None, *, timeout: float = CONNECT_TIMEOUT,
                       retries: int = RETRIES, backoff: float = 1.0) -> dict[str, Any]:
    """A small, stable description of what ``fetch(source)`` would get now; it changes exactly when that does.

    ``{"source", "kind", ...}``: ``synthetic`` (the generator's settings), ``file`` (``sha256``),
    ``folder`` (``tree_sha256``), ``url``/``d2l`` (:func:`probe_url`, or ``error`` when the server
    answers with an HTTP error, so that fetch runs and fails on it), ``unreachable`` (``auto``
    offline: the synthetic fallback's settings). When the server cannot be checked (unreachable,
    out of retries) but ``previous`` is this same source's fingerprint, ``previous`` is returned
    with a warning: an outage is not a new dataset, and must not swap real data for generated.
    ``source`` None: ``data.source``; ``data.url`` is read for ``d2l`` and ``auto`` only.
    """
    source = source or data.source
    kind = source_kind(source)
    generated = {"synthetic": data.synthetic.as_dict(), "image_size": data.image_size}
    if kind == "synthetic":
        return {"source": source, "kind": kind, **generated}
    if kind in ("file", "folder"):
        return {"source": source, "kind": kind,
                **(file_identity(Path(source)) if kind == "file" else tree_identity(Path(source)))}
    url = source if kind == "url" else data.url
    if not url:
        raise ValueError("params data.url is empty: no URL for the d2l archive")
    return _url_fingerprint(source, kind, url, generated, previous,
                            {"timeout": timeout, "retries": retries, "backoff": backoff})


def read_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint in ``path`` (written by :func:`check_source`), or None if there is none."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def fetched_fingerprint(data_dir: str | Path) -> dict[str, Any] | None:
    """The fingerprint the dataset in ``data_dir`` was fetched from (its manifest), or None."""
    manifest = read_fingerprint(Path(data_dir) / MANIFEST)
    return (manifest or {}).get("source_fingerprint")


def describe_fingerprint(fingerprint: dict[str, Any] | None) -> str:
    """A short human description: ``sha256 a1b2c3d4e5f6…``, ``ETag "x", 123 bytes``, ..."""
    if not fingerprint:
        return "none recorded"
    kind, fp = fingerprint.get("kind"), fingerprint
    if fp.get("error"):
        return f"{fp.get('url')}: {fp['error']}"
    if kind in ("synthetic", "unreachable"):
        synth = fp.get("synthetic") or {}
        text = (f"generated, seed {synth.get('seed', 0)}, {synth.get('train', '?')}+{synth.get('val', '?')} "
                f"images of {fp.get('image_size')} px")
        return f"{fp.get('url')} unreachable: {text}" if kind == "unreachable" else text
    if fp.get("sha256"):
        return f"sha256 {fp['sha256'][:12]}…"
    if fp.get("tree_sha256"):
        return f"tree sha256 {fp['tree_sha256'][:12]}… ({fp.get('files')} files)"
    parts = [f"ETag {fp['etag']}" if fp.get("etag") else "",
             f"Last-Modified {fp['last_modified']}" if fp.get("last_modified") else "",
             f"{fp['content_length']} bytes" if fp.get("content_length") is not None else ""]
    return ", ".join(p for p in parts if p) or str(kind)


def describe_change(previous: dict[str, Any] | None, current: dict[str, Any] | None) -> str:
    """``source unchanged (...)`` or ``source changed: <previous> -> <current>``."""
    if previous == current:
        return f"source unchanged ({describe_fingerprint(current)})"
    if previous is None:
        return f"no data fetched from a recorded source yet: {(current or {}).get('source')} ({describe_fingerprint(current)})"
    if current is not None and previous.get("source") != current.get("source"):
        return (f"source changed: {previous.get('source')} ({describe_fingerprint(previous)}) -> "
                f"{current.get('source')} ({describe_fingerprint(current)})")
    return f"source changed: {describe_fingerprint(previous)} -> {describe_fingerprint(current)}"


def fetch_reason(previous: dict[str, Any] | None, current: dict[str, Any] | None, outcome: str) -> dict[str, Any]:
    """Whether the data was fetched again and why, for a run summary.

    ``previous``: the fingerprint of the data before the run (:func:`fetched_fingerprint`, read
    before fetch ran); ``current``: the source's fingerprint now (:func:`read_fingerprint`);
    ``outcome``: the fetch stage's ``ran``, ``skipped`` or ``restored`` (from DVC's run cache).
    """
    if outcome == "skipped":
        reason = "source unchanged: skipped" if previous == current else \
            f"skipped (DVC saw no change) although {describe_change(previous, current)}"
        return {"fetched": False, "reason": reason, "fingerprint": current}
    if previous == current and previous is not None:
        reason = "source unchanged, but the fetch stage's params or code changed: fetched again"
    else:
        reason = describe_change(previous, current)
    if outcome == "restored":
        reason += " (restored from DVC's run cache)"
    return {"fetched": True, "reason": reason, "fingerprint": current}


def check_source(source: str | None, data: DataSettings, out: str | Path, data_dir: str | Path,
                 **probe: Any) -> dict[str, Any]:
    """The `source` stage: write the source's fingerprint to ``out`` (atomically, only when it changed).

    Returns ``{"fingerprint", "written", "change"}``, ``change`` comparing it with the fingerprint
    the data in ``data_dir`` was fetched from. ``probe``: ``timeout``/``retries``/``backoff``.
    """
    out = Path(out)
    before = read_fingerprint(out)
    fingerprint = source_fingerprint(source, data, before, **probe)
    written = fingerprint != before
    if written:
        atomic_write_json(out, fingerprint)
    return {"fingerprint": fingerprint, "written": written,
            "change": describe_change(fetched_fingerprint(data_dir), fingerprint)}
