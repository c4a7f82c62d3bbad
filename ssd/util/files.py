"""Atomic writes: every result is written to a temporary file beside its target, then renamed.

A reader therefore sees the old file or the new one, never half of one, and a crash leaves
at most a stray ``.tmp-*`` file that the next write replaces. Also the one file-digest helper.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (``sha256``, ``sha1``, ``md5``, ...), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


MIN_FREE_BYTES = 1 << 20  # a failed write with less than this left on its filesystem ran out of space


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A write that fails for want of space raises ``OSError(ENOSPC)`` saying so and naming ``path``,
    whatever the writer raised (``torch.save`` reports a full disk as an "unexpected pos" error).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes owner-only files; give results the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if _out_of_space(exc, path.parent):  # checked before the partial file goes
            raise OSError(errno.ENOSPC, f"no space left on device writing {path} "
                                        f"({shutil.disk_usage(path.parent).free} bytes free there)") from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < MIN_FREE_BYTES
    except OSError:
        return False


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_figure(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (the format comes from ``path``'s suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` whole.

    On failure the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    old = path.parent / f".old-{path.name}-{os.getpid()}"
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it (pid, host, since when)."""


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    The kernel releases an ``flock`` when its holder dies, so a killed process never leaves the
    lock taken; the file's text (pid, host, start time) only names the holder in the refusal.
    Raises LockHeld at once, without waiting, when another process holds it.
    """
    import fcntl
    import socket
    from datetime import datetime, timezone

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            raise LockHeld(f"held by {holder} (lock file {path})") from None
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # the lock goes with the close; an empty file names no one


@contextmanager
def waiting_lock(path: str | Path, wait_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """:func:`exclusive_lock`, waiting up to ``wait_s`` seconds for its holder to let go (then LockHeld)."""
    import time
    from contextlib import ExitStack

    deadline = time.monotonic() + wait_s
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(exclusive_lock(path))
                break
            except LockHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(poll_s)
        yield


def lock_file(folder: str | Path) -> Path:
    """The lock file that guards ``folder``: ``<folder>.lock`` beside it (its holder may replace the folder)."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".lock")
