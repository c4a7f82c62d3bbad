"""Fetch the banana dataset: download (or generate) an archive, verify it, extract it safely.

``fetch(source, sha1, out, params)`` is the one implementation; ``ssd fetch``, the DVC stage and the
Prefect flow call it. Sources:

* ``d2l``: the real archive at ``data.url``, checked against ``data.sha1``;
* ``auto``: ``d2l`` when the network answers; when it is unreachable (DNS failure, refused or
  timed-out connection) the synthetic dataset instead, with a loud warning, recorded in the
  manifest. A checksum mismatch or an HTTP error is never a reason to fall back;
* ``synthetic``: generated bananas (``ssd.synthetic``), seeded by ``data.synthetic.seed``;
* an ``http(s)://`` or ``file://`` URL, or a path to a zip (``--sha1`` checked when given).

Every source goes through the same verify + extract path. Extraction refuses absolute or ``..``
members, symlinks, and archives whose sizes are absurd (zip bombs), and writes only inside a
temporary folder that replaces ``out`` whole on success (``ssd.files.atomic_dir``): a failure leaves
the previous dataset, or nothing, never a partial one. ``out/manifest.json`` records what was fetched.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
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
from pathlib import Path, PurePosixPath
from typing import Any

from ssd.files import atomic_dir, atomic_write_json

DATASET_DIR = "banana-detection"
SPLIT_DIRS = ("bananas_train", "bananas_val")
CONNECT_TIMEOUT = 8.0        # seconds; an offline machine falls back to synthetic data this fast
RETRIES = 3                  # for transient failures only (timeouts mid-transfer, 5xx, resets)
MAX_TOTAL_BYTES = 4 << 30    # 4 GiB unpacked: the real archive is far smaller
MAX_MEMBERS = 100_000
MAX_RATIO = 200              # uncompressed / compressed per member: beyond it, a zip bomb
CHUNK = 1 << 20


class NetworkUnreachable(RuntimeError):
    """The server could not be reached at all (no DNS, refused or timed-out connection)."""


# ----------------------------------------------------------------------------------------------
# download

def _is_unreachable(exc: urllib.error.URLError) -> bool:
    """Whether opening the URL failed to reach the server at all (vs. a server that answered badly)."""
    reason = exc.reason
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)) or (
        isinstance(reason, OSError) and reason.errno in {101, 110, 113})  # ENETUNREACH, ETIMEDOUT, EHOSTUNREACH


def download(url: str, dest: Path, *, timeout: float = CONNECT_TIMEOUT, retries: int = RETRIES,
             backoff: float = 1.0, progress: bool = True) -> str:
    """Download ``url`` to ``dest``; returns its SHA-1 (hex).

    Raises ``NetworkUnreachable`` at once when the server cannot be reached (no retries, so an
    offline run decides fast); retries transient failures ``retries`` times with exponential
    backoff; raises ``RuntimeError`` for HTTP errors and when the retries run out.
    """
    from tqdm import tqdm

    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (URL from params/CLI)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code == 429:
                last = exc
                continue
            raise RuntimeError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:  # raised while connecting (DNS, TCP) or for a bad local path
            if _is_unreachable(exc):
                raise NetworkUnreachable(f"cannot reach {url}: {exc.reason}") from None
            raise RuntimeError(f"cannot open {url}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # connected, then no or a broken answer
            last = exc
            continue
        sha1 = hashlib.sha1()
        try:
            with response, open(dest, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {Path(urllib.parse.urlparse(url).path).name}",
                          disable=not progress, file=sys.stderr) as bar:
                    got = 0
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        sha1.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                if total is not None and got != total:
                    raise http.client.IncompleteRead(b"", total - got)
            return sha1.hexdigest()
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, short bodies: transient
            last = exc
    raise RuntimeError(f"download of {url} failed after {retries + 1} attempts: {last!r}")


def file_sha1(path: Path) -> str:
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha1.update(chunk)
    return sha1.hexdigest()


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
    for split in SPLIT_DIRS:
        d = root / DATASET_DIR / split
        if not (d / "images").is_dir() or not (d / "label.csv").is_file():
            raise ValueError(f"archive does not have the banana layout: missing {DATASET_DIR}/{split}/images "
                             f"or {DATASET_DIR}/{split}/label.csv")
        rows = sum(1 for line in (d / "label.csv").read_text().splitlines()[1:] if line.strip())
        counts[split] = {"images": sum(1 for p in (d / "images").iterdir() if p.is_file()), "label_rows": rows}
    return counts


# ----------------------------------------------------------------------------------------------
# the stage

def _warn(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _generate(work: Path, synth: dict[str, Any], image_size: int, progress: bool) -> Path:
    from ssd.synthetic import generate_archive

    archive = work / "synthetic-banana-detection.zip"
    generate_archive(archive, seed=int(synth.get("seed", 0)), train=int(synth.get("train", 1000)),
                     val=int(synth.get("val", 100)), image_size=image_size,
                     max_objects=int(synth.get("max_objects", 1)),
                     classes=list(synth.get("classes", ["banana"])), progress=progress)
    return archive


def fetch(source: str | None = None, sha1: str | None = None, out: str | Path = "data/raw",
          params: dict[str, Any] | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Fetch the dataset into ``out`` (``out/banana-detection/...`` and ``out/manifest.json``).

    Returns the manifest. Raises ``ValueError`` (checksum mismatch, unsafe or malformed archive),
    ``FileNotFoundError`` (missing zip) or ``RuntimeError`` (download failed); ``out`` is then untouched.
    """
    data = (params or {}).get("data", {})
    source = source or data.get("source", "auto")
    synth = dict(data.get("synthetic") or {})
    image_size = int(data.get("image_size", 256))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"requested_source": source, "synthetic_fallback": False}

    with tempfile.TemporaryDirectory(prefix=".tmp-fetch-", dir=out.parent) as work_dir:
        work = Path(work_dir)
        expected = sha1
        if source in ("auto", "d2l"):
            url = data.get("url")
            if not url:
                raise ValueError("params data.url is empty: no URL for the d2l archive")
            expected = sha1 or data.get("sha1")
            archive = work / Path(urllib.parse.urlparse(url).path).name
            try:
                computed = download(url, archive, progress=progress)
                manifest.update(resolved_source="d2l", url=url)
            except NetworkUnreachable as exc:
                if source != "auto":
                    raise
                _warn(f"{exc}.\nFalling back to the SYNTHETIC banana dataset (generated, not the real "
                      f"one). Results will not be comparable with the book's. Recorded in {out / 'manifest.json'}.")
                archive, expected = _generate(work, synth, image_size, progress), None
                computed = file_sha1(archive)
                manifest.update(resolved_source="synthetic", synthetic_fallback=True, fallback_reason=str(exc),
                                synthetic=synth)
        elif source == "synthetic":
            archive = _generate(work, synth, image_size, progress)
            computed = file_sha1(archive)
            manifest.update(resolved_source="synthetic", synthetic=synth)
        elif urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
            archive = work / (Path(urllib.parse.urlparse(source).path).name or "archive.zip")
            computed = download(source, archive, progress=progress)
            manifest.update(resolved_source="url", url=source)
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"source {source!r} is not auto, d2l, synthetic, a URL or an existing zip file")
            archive, computed = path, file_sha1(path)
            manifest.update(resolved_source="file", path=str(path.resolve()))

        if expected and computed.lower() != expected.lower():
            raise ValueError(f"SHA-1 mismatch for {manifest.get('url') or manifest.get('path') or source}: "
                             f"expected {expected}, got {computed}; refusing it (the previous data is kept)")
        manifest.update(sha1=computed, expected_sha1=expected or None, verified=bool(expected),
                        archive_bytes=archive.stat().st_size)

        with atomic_dir(out) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it private; a dataset folder is not
            manifest["extracted_files"] = safe_extract(archive, tmp)
            manifest["files"] = _check_layout(tmp)
            manifest["dataset"] = DATASET_DIR
            atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ssd.cli import add_params_arguments

    parser.add_argument("--source", help="auto, d2l, synthetic, a URL or a zip path (default: params data.source)")
    parser.add_argument("--sha1", help="expected SHA-1 of the archive (default for d2l/auto: params data.sha1)")
    parser.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_params_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from ssd.params import load_params

    params = load_params(args.params, args.set)
    manifest = fetch(args.source, args.sha1, args.out, params, progress=not args.quiet)
    files = ", ".join(f"{k}: {v['images']} images / {v['label_rows']} boxes" for k, v in manifest["files"].items())
    print(f"fetched {manifest['resolved_source']} dataset (sha1 {manifest['sha1']}) into "
          f"{Path(args.out) / DATASET_DIR}: {files}")
    if manifest["synthetic_fallback"]:
        print("NOTE: synthetic fallback (network unreachable); see manifest.json", file=sys.stderr)
    return 0
