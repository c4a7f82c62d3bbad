"""A lock the registry's server holds, so that writers of one registered model take turns.

MLflow has no compare-and-set on aliases or tags, but it creates a registered model atomically: the
store refuses a name that exists (a unique key in its database; ``RESOURCE_ALREADY_EXISTS``). The
lock on model ``name`` is the registered model ``name`` + :data:`LOCK_SUFFIX`: whoever creates it
holds it, and deleting it releases it. ``ssd register`` and ``ssd promote`` hold it while they find
or register a version, decide, and move the aliases (``ssd.mlops.registry``, ``ssd.stages.register``).

A holder that dies cannot release it, so it is a lease: the holder renews the tag
:data:`HEARTBEAT` every :data:`RENEW_S` seconds in a thread; a waiter that sees the same owner and
heartbeat for :data:`STALE_S` seconds (timed by its own monotonic clock, so no clock is shared
between machines) deletes the lock, after reading it once more, and tries again. Waiting longer than
:data:`WAIT_S` raises ``TransientError`` (exit 75: the flow retries later).

What it does not guarantee (docs/registry.md, "Concurrent registrations"): a holder stalled for more
than :data:`STALE_S` (its heartbeat thread included) can lose the lock to a waiter while it
continues; :meth:`Lease.check` before each alias move narrows that to one request's time. Writers that
do not take the lock (a person in the UI) are not held back; the register stage re-reads the champion
right before moving it for them.
"""
from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ssd.mlops.tracking import is_missing
from ssd.util.errors import TransientError

LOCK_SUFFIX = ".registry-lock"
OWNER, HEARTBEAT = "ssd.lock.owner", "ssd.lock.heartbeat"   # the lock's tags
RENEW_S = 5.0      # the holder's heartbeat period
STALE_S = 60.0     # a heartbeat unchanged this long: the holder is presumed dead
WAIT_S = 900.0     # the longest wait for a live holder before giving up (exit 75)
POLL_S = 0.5       # a waiter's period, jittered so that waiters do not move in step


def lock_name(name: str) -> str:
    return name + LOCK_SUFFIX


def _already_exists(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_ALREADY_EXISTS"


def _holder(client: Any, lock: str) -> tuple[str, str] | None:
    """``(owner, heartbeat)`` of the lock, or None when nobody holds it."""
    try:
        tags = client.get_registered_model(lock).tags or {}
    except Exception as exc:
        if is_missing(exc):
            return None
        raise
    return tags.get(OWNER, ""), tags.get(HEARTBEAT, "")


class Lease:
    """The held lock: renewed in a thread until :meth:`release`; :meth:`check` says it is still ours."""

    def __init__(self, client: Any, lock: str, owner: str, renew_s: float) -> None:
        self.client, self.lock, self.owner = client, lock, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(renew_s,), daemon=True, name="ssd-lease")
        self._thread.start()

    def _renew(self, period: float) -> None:
        beat = 0
        while not self._stop.wait(period):
            beat += 1
            try:  # a missed beat is retried next period; check() tells the holder when the lock is gone
                holder = _holder(self.client, self.lock)
                if holder is None or holder[0] != self.owner:
                    return  # taken over: never keep another holder's lock alive
                self.client.set_registered_model_tag(self.lock, HEARTBEAT, str(beat))
            except Exception:
                pass

    def check(self) -> None:
        """``TransientError`` unless this process still holds the lock (read from the server now)."""
        holder = _holder(self.client, self.lock)
        if holder is None or holder[0] != self.owner:
            raise TransientError(f"lost the registry lock {self.lock!r} (now held by "
                                 f"{holder[0] if holder else 'nobody'}): no alias moved; run it again")

    def release(self) -> None:
        """Delete the lock if it is still ours; a failure is only warned about (it then goes stale)."""
        self._stop.set()
        self._thread.join()
        try:
            holder = _holder(self.client, self.lock)
            if holder is not None and holder[0] == self.owner:  # never delete a lock another process took over
                self.client.delete_registered_model(self.lock)
        except Exception as exc:
            if not is_missing(exc):
                print(f"warning: could not release the registry lock {self.lock!r} ({type(exc).__name__}); "
                      f"others take it over after {STALE_S:g} s without heartbeat", file=sys.stderr)


def _acquire(client: Any, lock: str, owner: str, stale_s: float, wait_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + wait_s
    seen, seen_at = None, time.monotonic()
    while True:
        try:
            client.create_registered_model(lock, tags={OWNER: owner, HEARTBEAT: "0"},
                                           description=f"held by `ssd` ({owner}) while it writes the model's "
                                                       "versions or aliases; deleted when it ends")
            return
        except Exception as exc:
            if not _already_exists(exc):
                raise
        holder = _holder(client, lock)
        if holder is not None and holder[0] == owner:  # our create went through; its answer was lost
            return
        now = time.monotonic()
        if holder != seen:
            seen, seen_at = holder, now
        elif holder is not None and now - seen_at >= stale_s:
            _break(client, lock, holder, now - seen_at)
            continue
        if now >= deadline:
            raise TransientError(f"the registry lock {lock!r} is held by {holder[0] if holder else '?'} "
                                 f"(waited {wait_s:g} s): try again later")
        time.sleep(poll_s * random.uniform(0.5, 1.5))


def _break(client: Any, lock: str, holder: tuple[str, str], idle_s: float) -> None:
    """Delete a lock whose heartbeat stood still, unless it changed hands since it was read."""
    if _holder(client, lock) != holder:
        return
    print(f"warning: the registry lock {lock!r} held by {holder[0]} has had no heartbeat for {idle_s:.0f} s: "
          f"taken over", file=sys.stderr)
    try:
        client.delete_registered_model(lock)
    except Exception as exc:
        if not is_missing(exc):
            raise


@contextmanager
def registry_lock(client: Any, name: str, *, stale_s: float = STALE_S, wait_s: float = WAIT_S,
                  renew_s: float = RENEW_S, poll_s: float = POLL_S) -> Iterator[Lease]:
    """Hold the lock on registered model ``name`` for the ``with`` block (see the module docstring)."""
    lock = lock_name(name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    _acquire(client, lock, owner, stale_s, wait_s, poll_s)
    lease = Lease(client, lock, owner, renew_s)
    try:
        yield lease
    finally:
        lease.release()
