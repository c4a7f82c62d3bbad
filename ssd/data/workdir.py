"""Work folders beside a fetch's output, and the cleanup of those that killed fetches left behind.

A fetch writes everything inside a work folder named by :func:`work_prefix` beside its output, so
its final rename stays on one filesystem. A fetch that was killed leaves its work folder; the next
one removes it (:func:`remove_leftovers`) once no live process of that name holds it, telling a
live process from a reused pid by its start time in ``/proc``.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

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
