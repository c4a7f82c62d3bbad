"""Fetch the banana dataset: download (or generate) an archive, verify it, extract it safely.

``fetch(source, sha1, out, params)`` is the one implementation; ``ssd fetch``, the DVC stage and the
Prefect flow call it. Sources:

* ``d2l``: the real archive at ``data.url``, checked against ``data.sha1``;
* ``auto``: ``d2l`` when the network answers; when it is unreachable (DNS failure, refused or
  timed-out connection) the synthetic dataset instead, with a loud warning, recorded in the
  manifest. A checksum mismatch or an HTTP error is never a reason to fall back;
* ``synthetic``: generated bananas (``ssd.data.synthetic``), seeded by ``data.synthetic.seed``;
* an ``http(s)://`` or ``file://`` URL, or a path to a zip (``--sha1`` checked when given);
* a path to a dataset folder, in the banana layout (``[banana-detection/]bananas_train`` and
  ``bananas_val``) or with ``train/`` and ``val/``, each split holding ``images/`` and ``label.csv``:
  copied into the banana layout, so every later stage sees one layout.

Every archive goes through the same verify + extract path. Extraction refuses absolute or ``..``
members, symlinks, and archives whose sizes are absurd (zip bombs). Everything is written inside a
work folder beside ``out`` (``.tmp-fetch-<pid>-<start>-<host>-*``) whose new dataset replaces ``out``
whole on success (two renames): a failure leaves the previous dataset, or nothing, never a partial
one. A fetch that was killed leaves its work folder behind; the next fetch removes it, once no live
process of that name holds it. ``out/manifest.json`` records what was fetched.

``check_source`` (``ssd source``, the always-run DVC stage before fetch) writes a small fingerprint
of the source to ``data/source.json``, only when it changed: the zip's SHA-256, a folder's tree hash,
a URL's ETag/Last-Modified/Content-Length from a HEAD request (its body's SHA-256 when the server
gives neither), the generator's settings, or ``unreachable`` for ``auto`` offline. Fetch depends on
that file, so DVC reruns it exactly when the source changed, and records it in the manifest.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, TypeVar

from ssd.util.errors import TransientError
from ssd.util.files import atomic_write_json, file_digest
from ssd.data.layout import DATASET_DIR, IMAGES_DIR, LABEL_FILE, RAW_DIR, SOURCE_FILE, SPLIT_DIRS

CONNECT_TIMEOUT = 8.0        # seconds; an offline machine falls back to synthetic data this fast
RETRIES = 3                  # for transient failures only (timeouts mid-transfer, 5xx, resets)
MAX_TOTAL_BYTES = 4 << 30    # 4 GiB unpacked: the real archive is far smaller
MAX_MEMBERS = 100_000
MAX_RATIO = 200              # uncompressed / compressed per member: beyond it, a zip bomb
CHUNK = 1 << 20


T = TypeVar("T")


class NetworkUnreachable(TransientError):
    """The server could not be reached at all (no DNS, refused or timed-out connection)."""


# ----------------------------------------------------------------------------------------------
# download

def _is_unreachable(exc: urllib.error.URLError) -> bool:
    """Whether opening the URL failed to reach the server at all (vs. a server that answered badly)."""
    reason = exc.reason
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)) or (
        isinstance(reason, OSError) and reason.errno in {101, 110, 113})  # ENETUNREACH, ETIMEDOUT, EHOSTUNREACH


class HTTPStatusError(RuntimeError):
    """The server answered with an HTTP error that retrying will not fix (4xx other than 429, 501)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _with_retries(url: str, attempt: Callable[[], T], what: str, retries: int, backoff: float) -> T:
    """``attempt()`` (one request to ``url``), retried on transient failures with exponential backoff.

    Raises ``NetworkUnreachable`` at once when the server cannot be reached (no retries, so an
    offline run decides fast), ``HTTPStatusError`` for a 4xx or 501 answer, ``RuntimeError`` for a URL
    that cannot be opened, and ``TransientError`` (exit 75) when the retries (timeouts, resets, 5xx,
    429) run out.
    """
    last: BaseException | None = None
    for attempt_no in range(retries + 1):
        if attempt_no:
            time.sleep(backoff * 2 ** (attempt_no - 1))
        try:
            return attempt()
        except urllib.error.HTTPError as exc:
            if (exc.code >= 500 and exc.code != 501) or exc.code == 429:  # 501: the method never works there
                last = exc
                continue
            raise HTTPStatusError(f"{what} {url} failed: HTTP {exc.code} {exc.reason}", exc.code) from None
        except urllib.error.URLError as exc:  # raised while connecting (DNS, TCP) or for a bad local path
            if _is_unreachable(exc):
                raise NetworkUnreachable(f"cannot reach {url}: {exc.reason}") from None
            raise RuntimeError(f"cannot open {url}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # connected, then no, a broken or a short answer
            last = exc
    raise TransientError(f"{what} {url} failed after {retries + 1} attempts: {last!r}")


def _stream(url: str, sink: Callable[[bytes], None], timeout: float, progress: bool) -> None:
    """GET ``url`` and pass its body to ``sink`` chunk by chunk; a body shorter than its
    Content-Length raises ``IncompleteRead`` (transient for :func:`_with_retries`)."""
    from tqdm import tqdm

    response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (URL from params/CLI)
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {Path(urllib.parse.urlparse(url).path).name}",
                  disable=not progress, file=sys.stderr) as bar:
            got = 0
            while chunk := response.read(CHUNK):
                sink(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise http.client.IncompleteRead(b"", total - got)


def download(url: str, dest: Path, *, timeout: float = CONNECT_TIMEOUT, retries: int = RETRIES,
             backoff: float = 1.0, progress: bool = True) -> str:
    """Download ``url`` to ``dest``; returns its SHA-1 (hex).

    Raises ``NetworkUnreachable`` at once when the server cannot be reached; retries transient
    failures ``retries`` times with exponential backoff; raises ``RuntimeError`` (``HTTPStatusError``
    for a 4xx answer) for HTTP errors and when the retries run out.
    """
    def attempt() -> str:
        sha1 = hashlib.sha1()
        with open(dest, "wb") as f:
            def sink(chunk: bytes) -> None:
                f.write(chunk)
                sha1.update(chunk)

            _stream(url, sink, timeout, progress)
        return sha1.hexdigest()

    return _with_retries(url, attempt, "download of", retries, backoff)


# ----------------------------------------------------------------------------------------------
# safe extraction

def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in path.parts:
        return "'..' in path"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: a plain file
        return "not a regular file"
    if info.file_size > MAX_RATIO * max(info.compress_size, 1) and info.file_size > CHUNK:
        return f"compression ratio {info.file_size / max(info.compress_size, 1):.0f}x (zip bomb?)"
    return None


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract ``archive`` into ``dest`` after checking every member; returns the number of files.

    Raises ``ValueError`` naming every unsafe member, or the reason the archive cannot be read.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{archive}: not a readable zip archive ({exc}); truncated or corrupt download?") from None
    with zf:
        members = zf.infolist()
        problems = [f"{m.filename!r}: {p}" for m in members if (p := _member_problem(m))]
        total = sum(m.file_size for m in members)
        if len(members) > MAX_MEMBERS:
            problems.append(f"{len(members)} members (more than {MAX_MEMBERS})")
        if total > MAX_TOTAL_BYTES:
            problems.append(f"{total} bytes unpacked (more than {MAX_TOTAL_BYTES})")
        if problems:
            raise ValueError(f"{archive}: refusing unsafe archive:\n  " + "\n  ".join(problems))
        root = dest.resolve()
        files = 0
        for m in members:
            target = (dest / m.filename).resolve()
            if root not in target.parents and target != root:  # belt and braces after the checks above
                raise ValueError(f"{archive}: member {m.filename!r} would land outside {dest}")
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(m) as src, open(target, "wb") as out:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > m.file_size:  # the header lied about the size
                            raise ValueError(f"{archive}: member {m.filename!r} is larger than it declares")
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise ValueError(f"{archive}: member {m.filename!r} is corrupt ({exc})") from None
            files += 1
    return files


def _check_layout(root: Path) -> dict[str, dict[str, int]]:
    """File counts per split; ``ValueError`` unless the banana layout is there."""
    counts = {}
    for split in SPLIT_DIRS.values():
        d = root / DATASET_DIR / split
        if not (d / IMAGES_DIR).is_dir() or not (d / LABEL_FILE).is_file():
            raise ValueError(f"archive does not have the banana layout: missing {DATASET_DIR}/{split}/{IMAGES_DIR} "
                             f"or {DATASET_DIR}/{split}/{LABEL_FILE}")
        rows = sum(1 for line in (d / LABEL_FILE).read_bytes().splitlines()[1:] if line.strip())
        counts[split] = {"images": sum(1 for p in (d / IMAGES_DIR).iterdir() if p.is_file()), "label_rows": rows}
    return counts


# ----------------------------------------------------------------------------------------------
# dataset folders

def folder_splits(root: Path) -> dict[str, Path]:
    """The train and val split folders of a dataset folder: the banana layout (``bananas_train`` and
    ``bananas_val``, directly or under ``banana-detection/``) or ``train/`` and ``val/``, each split with
    ``images/`` and ``label.csv`` (or ``labels.csv``). ``ValueError`` naming what is missing otherwise."""
    from ssd.data.dataset import LABEL_FILES

    base = root / DATASET_DIR if (root / DATASET_DIR).is_dir() else root
    layouts = {"banana layout": {split: base / d for split, d in SPLIT_DIRS.items()},
               "train/val layout": {"train": root / "train", "val": root / "val"}}
    missing: dict[str, list[str]] = {}
    for name, splits in layouts.items():
        gaps = [d / IMAGES_DIR for d in splits.values() if not (d / IMAGES_DIR).is_dir()]
        gaps += [d / LABEL_FILE for d in splits.values() if not any((d / f).is_file() for f in LABEL_FILES)]
        if not gaps:
            return splits
        missing[name] = [p.relative_to(root).as_posix() for p in gaps]
    raise ValueError(f"source folder {root} has neither dataset layout (each split needs images/ and label.csv): "
                     + "; ".join(f"{name}: missing {', '.join(gaps)}" for name, gaps in missing.items()))


def copy_folder(root: Path, dest: Path) -> int:
    """Copy the dataset folder ``root`` (:func:`folder_splits`) into ``dest`` in the banana layout
    (``dest/bananas_train``, ``dest/bananas_val``); returns the number of files copied. Hidden files
    (``.DS_Store`` and the like) and subfolders of ``images/`` are left out: they are never images."""
    from ssd.data.dataset import label_file

    files = 0
    for split, src in folder_splits(root).items():
        name = SPLIT_DIRS[split]
        (dest / name / IMAGES_DIR).mkdir(parents=True)
        shutil.copyfile(label_file(src), dest / name / LABEL_FILE)
        for path in sorted((src / IMAGES_DIR).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                shutil.copyfile(path, dest / name / IMAGES_DIR / path.name)
                files += 1
        files += 1
    return files


# ----------------------------------------------------------------------------------------------
# work folders, and the leftovers of killed fetches

WORK_PREFIX = ".tmp-fetch-"
_WORK_NAME = re.compile(rf"{re.escape(WORK_PREFIX)}(?P<pid>\d+)-(?P<start>\d+)-(?P<host>.+)-[^-]+")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from /proc): None when /proc says there is
    no such process, 0 when it cannot tell (no /proc on this system)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else 0
    except OSError:
        return 0
    try:
        return int(text.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (IndexError, ValueError):
        return 0


def _alive(pid: int, start: int) -> bool:
    """Whether the process that made a work folder still runs: ``pid`` is alive and, where /proc tells,
    started at ``start`` (a pid reused by another process must not keep a leftover forever)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    now = _process_start(pid)
    if now is None:  # gone since
        return False
    return not (start and now) or now == start


def work_prefix() -> str:
    """``.tmp-fetch-<pid>-<start>-<host>-``: a work folder says which process, started when, on which
    host made it, so a later fetch can tell a leftover from a folder in use."""
    return f"{WORK_PREFIX}{os.getpid()}-{_process_start(os.getpid()) or 0}-{_host()}-"


def remove_leftovers(parent: Path) -> list[Path]:
    """Remove the work folders that killed fetches left in ``parent``; returns them.

    Only folders named by :func:`work_prefix` on this host (another host's process cannot be checked
    from here, e.g. on a shared disk) whose process is gone; nothing else is touched.
    """
    removed = []
    for path in sorted(Path(parent).glob(WORK_PREFIX + "*")):
        match = _WORK_NAME.fullmatch(path.name)
        if not match or match["host"] != _host() or path.is_symlink() or not path.is_dir():
            continue
        if _alive(int(match["pid"]), int(match["start"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------
# sources: what a source names, and its fingerprint (the `source` stage)

HEAD_REFUSED = {403, 405, 501}  # servers that refuse HEAD but serve GET (e.g. URLs presigned for GET)


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
    """``tree_sha256`` over every file's relative path and SHA-256 under ``root``, with ``files`` and ``bytes``."""
    root = Path(root)
    digest, files, size = hashlib.sha256(), 0, 0
    for path in sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + bytes.fromhex(file_digest(path)))
        files, size = files + 1, size + path.stat().st_size
    return {"tree_sha256": digest.hexdigest(), "files": files, "bytes": size}


def probe_url(url: str, *, timeout: float = CONNECT_TIMEOUT, retries: int = RETRIES,
              backoff: float = 1.0) -> dict[str, Any]:
    """What identifies the archive at ``url`` now, cheaply.

    A HEAD request's ``etag``, ``last_modified`` and ``content_length``; when the server sends
    neither validator or refuses HEAD, the ``sha256`` and ``bytes`` of the body (streamed, nothing
    written). A ``file://`` URL is hashed (its mtime is too coarse to trust). Errors as :func:`download`.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return file_identity(Path(urllib.request.url2pathname(parsed.path)))

    def head() -> Any:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:  # noqa: S310
            return response.headers

    try:
        headers = _with_retries(url, head, "HEAD request to", retries, backoff)
    except HTTPStatusError as exc:
        if exc.code not in HEAD_REFUSED:
            raise
        headers = None
    if headers is not None and (headers.get("ETag") or headers.get("Last-Modified")):
        length = headers.get("Content-Length")
        # Content-Length alone would miss a same-size replacement, so it only ever adds to a validator.
        return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
                "content_length": int(length) if length and length.isdigit() else None}

    def hash_body() -> dict[str, Any]:
        digest, size = hashlib.sha256(), 0

        def sink(chunk: bytes) -> None:
            nonlocal size
            digest.update(chunk)
            size += len(chunk)

        _stream(url, sink, timeout, progress=False)
        return {"sha256": digest.hexdigest(), "bytes": size}

    return _with_retries(url, hash_body, "download of", retries, backoff)


def source_fingerprint(source: str | None, params: dict[str, Any],
                       previous: dict[str, Any] | None = None, *, timeout: float = CONNECT_TIMEOUT,
                       retries: int = RETRIES, backoff: float = 1.0) -> dict[str, Any]:
    """A small, stable description of what ``fetch(source)`` would get now; it changes exactly when that does.

    ``{"source", "kind", ...}``: ``synthetic`` (the generator's settings), ``file`` (``sha256``),
    ``folder`` (``tree_sha256``), ``url``/``d2l`` (:func:`probe_url`, or ``error`` when the server
    answers with an HTTP error, so that fetch runs and fails on it), ``unreachable`` (``auto``
    offline: the synthetic fallback's settings). When the server cannot be checked (unreachable,
    out of retries) but ``previous`` is this same source's fingerprint, ``previous`` is returned
    with a warning: an outage is not a new dataset, and must not swap real data for generated.
    """
    data = params["data"]
    source = source or data["source"]
    kind = source_kind(source)
    generated = {"synthetic": dict(data["synthetic"]), "image_size": data["image_size"]}
    if kind == "synthetic":
        return {"source": source, "kind": kind, **generated}
    if kind in ("file", "folder"):
        return {"source": source, "kind": kind,
                **(file_identity(Path(source)) if kind == "file" else tree_identity(Path(source)))}
    url = source if kind == "url" else data["url"]
    if not url:
        raise ValueError("params data.url is empty: no URL for the d2l archive")
    resolved = "url" if kind == "url" else "d2l"
    try:
        return {"source": source, "kind": resolved, "url": url,
                **probe_url(url, timeout=timeout, retries=retries, backoff=backoff)}
    except HTTPStatusError as exc:
        return {"source": source, "kind": resolved, "url": url, "error": f"HTTP {exc.code}"}
    except (NetworkUnreachable, RuntimeError) as exc:
        unreachable = isinstance(exc, NetworkUnreachable)
        if (previous and previous.get("source") == source and previous.get("kind") == resolved
                and previous.get("url") == url and not previous.get("error")):
            _warn(f"{exc}.\nCannot tell whether {url} changed: keeping the fingerprint of the data fetched "
                  f"from it before, so fetch does not run again (and does not fall back to generated data).")
            return previous
        if kind == "auto" and unreachable:
            return {"source": source, "kind": "unreachable", "url": url, **generated}
        return {"source": source, "kind": resolved, "url": url,
                "error": "unreachable" if unreachable else "no answer after retries"}


def read_fingerprint(path: str | Path = SOURCE_FILE) -> dict[str, Any] | None:
    """The fingerprint in ``path`` (written by :func:`check_source`), or None if there is none."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def fetched_fingerprint(data_dir: str | Path = RAW_DIR) -> dict[str, Any] | None:
    """The fingerprint the dataset in ``data_dir`` was fetched from (its manifest), or None."""
    manifest = read_fingerprint(Path(data_dir) / "manifest.json")
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


def check_source(source: str | None, params: dict[str, Any],
                 out: str | Path = SOURCE_FILE, data_dir: str | Path = RAW_DIR,
                 **probe: Any) -> dict[str, Any]:
    """The `source` stage: write the source's fingerprint to ``out`` (atomically, only when it changed).

    Returns ``{"fingerprint", "written", "change"}``, ``change`` comparing it with the fingerprint
    the data in ``data_dir`` was fetched from. ``probe``: ``timeout``/``retries``/``backoff``.
    """
    out = Path(out)
    before = read_fingerprint(out)
    fingerprint = source_fingerprint(source, params, before, **probe)
    written = fingerprint != before
    if written:
        atomic_write_json(out, fingerprint)
    return {"fingerprint": fingerprint, "written": written,
            "change": describe_change(fetched_fingerprint(data_dir), fingerprint)}


# ----------------------------------------------------------------------------------------------
# the stage

def _warn(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _generate(work: Path, synth: dict[str, Any], image_size: int, progress: bool) -> Path:
    from ssd.data.synthetic import generate_archive

    archive = work / "synthetic-banana-detection.zip"
    generate_archive(archive, seed=synth["seed"], train=synth["train"], val=synth["val"], image_size=image_size,
                     max_objects=synth["max_objects"], classes=synth["classes"], progress=progress)
    return archive


# What a fingerprint's kind resolves to in the manifest: the fingerprint is recorded only when they agree.
_RESOLVES_TO = {"d2l": "d2l", "unreachable": "synthetic", "synthetic": "synthetic", "url": "url", "file": "file",
                "folder": "folder"}


@dataclass(frozen=True)
class _Request:
    """What one fetch was asked for, resolved against params before anything is written."""
    source: str
    kind: str                           # source_kind(source)
    sha1: str | None                    # --sha1 as given; d2l/auto default to params data.sha1
    data: dict[str, Any]                # params' data section (url and sha1 read only for d2l/auto)
    synth: dict[str, Any]
    image_size: int
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


def _resolve(source: str | None, sha1: str | None, params: dict[str, Any], fingerprint: dict[str, Any] | None,
             progress: bool) -> _Request:
    data = params["data"]
    source = source or data["source"]
    synth, image_size = dict(data["synthetic"]), data["image_size"]
    kind = source_kind(source)
    if kind == "folder" and sha1:
        raise ValueError(f"a SHA-1 checks an archive, and source {source!r} is a folder")
    if fingerprint is not None and fingerprint.get("source") != source:
        fingerprint = None  # a check of another source (a stale file, or `ssd fetch --source` by hand)
    return _Request(source, kind, sha1, data, synth, image_size, fingerprint, progress)


def _obtain_synthetic(request: _Request, work: Path, fallback_reason: str | None = None) -> _Obtained:
    archive = _generate(work, request.synth, request.image_size, request.progress)
    origin: dict[str, Any] = {"resolved_source": "synthetic"}
    if fallback_reason is not None:
        origin.update(synthetic_fallback=True, fallback_reason=fallback_reason)
    origin["synthetic"] = request.synth
    # A fallback's data were never asked for: the checksum given was the d2l archive's.
    expected = None if fallback_reason is not None else request.sha1
    return _Obtained(archive, file_digest(archive, "sha1"), expected, origin)


def _obtain_d2l(request: _Request, work: Path, out: Path) -> _Obtained:
    """The d2l archive; for ``auto``, generated data when the network is unreachable, unless the
    source check saw the URL answer (then the data would silently change kind: an error instead)."""
    url = request.data["url"]
    if not url:
        raise ValueError("params data.url is empty: no URL for the d2l archive")
    expected = request.sha1 or request.data["sha1"]
    archive = work / Path(urllib.parse.urlparse(url).path).name
    try:
        computed = download(url, archive, progress=request.progress)
    except NetworkUnreachable as exc:
        if request.kind != "auto" or (request.fingerprint or {}).get("kind") == "d2l":
            raise
        _warn(f"{exc}.\nFalling back to the SYNTHETIC banana dataset (generated, not the real "
              f"one). Results will not be comparable with the book's. Recorded in {out / 'manifest.json'}.")
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
        archive = work / (Path(urllib.parse.urlparse(source).path).name or "archive.zip")
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
    return {**counts, "files": _check_layout(new), "dataset": DATASET_DIR}


def _swap_in(new: Path, out: Path, old: Path) -> None:
    """Two renames: ``out`` is whole before and after, never a mix (``old`` goes with the work folder)."""
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)


def fetch(source: str | None, sha1: str | None, out: str | Path, params: dict[str, Any], *, progress: bool = True,
          fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fetch the dataset into ``out`` (``out/banana-detection/...`` and ``out/manifest.json``).

    ``fingerprint``: the source's fingerprint from the `source` stage (:func:`check_source`); it is
    recorded in the manifest as ``source_fingerprint`` when it describes what was fetched, so the
    next check can tell whether the data is still current. When it says the ``auto`` URL answered,
    failing to reach it now is an error, not a reason to fall back to generated data.

    A folder source (:func:`folder_splits`) is copied into the banana layout. Work folders of killed
    fetches beside ``out`` are removed first (:func:`remove_leftovers`).

    Returns the manifest. Raises ``ValueError`` (checksum mismatch, unsafe or malformed archive, a
    folder in neither layout, a source that changed since the check), ``FileNotFoundError`` (missing
    zip) or ``RuntimeError`` (download failed); ``out`` is then untouched.
    """
    request = _resolve(source, sha1, params, fingerprint, progress)
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
        atomic_write_json(new / "manifest.json", manifest)
        _swap_in(new, out, work / "old")
    return manifest


# ----------------------------------------------------------------------------------------------
# CLI
