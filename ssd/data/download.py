"""HTTP with bounded retries: download an archive, or stream a body, telling an unreachable server
(:class:`NetworkUnreachable`, no retries: an offline run decides fast) from a server that answered
badly (:class:`HTTPStatusError`) and from transient failures (retried with exponential backoff, then
``TransientError``, exit 75).
"""
from __future__ import annotations

import hashlib
import http.client
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from ssd.util.errors import TransientError

CONNECT_TIMEOUT = 8.0        # seconds; an offline machine falls back to synthetic data this fast
RETRIES = 3                  # for transient failures only (timeouts mid-transfer, 5xx, resets)
CHUNK = 1 << 20

T = TypeVar("T")


class NetworkUnreachable(TransientError):
    """The server could not be reached at all (no DNS, refused or timed-out connection)."""


class HTTPStatusError(RuntimeError):
    """The server answered with an HTTP error that retrying will not fix (4xx other than 429, 501)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _is_unreachable(exc: urllib.error.URLError) -> bool:
    """Whether opening the URL failed to reach the server at all (vs. a server that answered badly)."""
    reason = exc.reason
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)) or (
        isinstance(reason, OSError) and reason.errno in {101, 110, 113})  # ENETUNREACH, ETIMEDOUT, EHOSTUNREACH


def with_retries(url: str, attempt: Callable[[], T], what: str, retries: int, backoff: float) -> T:
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


def stream(url: str, sink: Callable[[bytes], None], timeout: float, progress: bool) -> None:
    """GET ``url`` and pass its body to ``sink`` chunk by chunk; a body shorter than its
    Content-Length raises ``IncompleteRead`` (transient for :func:`with_retries`)."""
    from tqdm import tqdm

    response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (URL from params/CLI)
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {url_name(url)}",
                  disable=not progress, file=sys.stderr) as bar:
            got = 0
            while chunk := response.read(CHUNK):
                sink(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise http.client.IncompleteRead(b"", total - got)


def url_name(url: str) -> str:
    """The file name at the end of ``url``'s path (empty for ``http://host/``)."""
    return Path(urllib.parse.urlparse(url).path).name


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

            stream(url, sink, timeout, progress)
        return sha1.hexdigest()

    return with_retries(url, attempt, "download of", retries, backoff)


def head(url: str, refused: set[int], *, timeout: float, retries: int,
         backoff: float) -> http.client.HTTPMessage | None:
    """The headers of a HEAD request to ``url``; None when the server answers with a code in ``refused``
    (some serve GET but refuse HEAD). Errors as :func:`with_retries`."""
    def attempt() -> http.client.HTTPMessage:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:  # noqa: S310
            return response.headers

    try:
        return with_retries(url, attempt, "HEAD request to", retries, backoff)
    except HTTPStatusError as exc:
        if exc.code not in refused:
            raise
        return None


def hash_body(url: str, *, timeout: float, retries: int, backoff: float) -> dict[str, object]:
    """``sha256`` and ``bytes`` of ``url``'s body, streamed (nothing written). Errors as :func:`with_retries`."""
    def attempt() -> dict[str, object]:
        digest, size = hashlib.sha256(), 0

        def sink(chunk: bytes) -> None:
            nonlocal size
            digest.update(chunk)
            size += len(chunk)

        stream(url, sink, timeout, progress=False)
        return {"sha256": digest.hexdigest(), "bytes": size}

    return with_retries(url, attempt, "download of", retries, backoff)
