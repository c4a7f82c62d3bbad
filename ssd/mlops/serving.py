"""The champion behind ``ssd serve``: the loaded version, the scoring of one request, and the follower
that swaps in another version when the alias moves. The HTTP side is ``ssd.mlops.scoring_server``.

:class:`Served` is one loaded version: its :class:`~ssd.engine.inference.Detector`, its default score
threshold and image limit, when it was loaded. :func:`score` answers one request with it exactly as the
pyfunc does (``ssd.mlops.pyfunc``: the same decoding, detection and output table), with the images
decoded outside ``gate`` and the net run inside it: a semaphore of a few slots keeps concurrent
requests from oversubscribing torch's threads while their decoding overlaps the net.

:class:`Follower` holds the one reference requests read (:attr:`Follower.current`). For
``models:/<name>@<alias>`` a background thread polls the registry every ``poll_seconds``; when the alias
names another version it loads that version (weights and settings through the ``load`` it is given,
never code stored in the registry), checks that it detects on a generated image, and only then replaces
the reference: one assignment, and a request reads it once, so requests in flight finish on the version
they started with and none waits or fails during the swap. A promotion is served within
``poll_seconds`` plus the load time (the registry's answer, a download of a few MB, one detection).

A poll or load that fails (registry unreachable, a version that is not a TinySSD or does not detect)
leaves the current version serving; the error is kept for ``/health`` (:meth:`Follower.status`) and
logged once per distinct problem: an unreachable registry is logged once while it stays unreachable,
whatever each failed connection said (refused, reset, timed out). A version refused for what it is
(not a transient error) is not downloaded again: registered versions do not change. Any other model
(``models:/<name>/<N>``, a run's model, a file) is loaded once; the thread only retries until that
first load succeeds.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple, Sequence

import pandas as pd

from ssd.engine.inference import Detector, detect
from ssd.mlops.models import registered_parts, resolve
from ssd.mlops.pyfunc import decode_images, detections_frame, example_png
from ssd.mlops.records import version_uri
from ssd.util.errors import is_transient

class Served(NamedTuple):
    """One loaded version and the settings it answers with."""
    detector: Detector
    threshold: float      # the default minimum score (the model's evaluate.threshold, unless a param says)
    max_pixels: int       # data.max_image_pixels: larger images are refused
    loaded_at: float      # time.time() when it passed its check (set by the Follower)

    @property
    def name(self) -> str:
        return (self.detector.source and self.detector.source.name) or ""

    @property
    def version(self) -> str:
        """The registered version as the output table writes it ("" for a run's model or a file)."""
        version = self.detector.source.version if self.detector.source else None
        return "" if version is None else str(version)


def score(served: Served, values: Sequence[Any], threshold: float, gate: AbstractContextManager) -> pd.DataFrame:
    """The pyfunc's output table (``ssd.mlops.pyfunc.OUTPUT_COLUMNS``) for the column ``image`` ``values``
    (base64 text or bytes); ``ValueError`` naming the first bad row."""
    detector = served.detector
    images, sizes = decode_images(values, detector.image_size, served.max_pixels)
    with gate:
        found = detect(detector.net, images, sizes, threshold, detector.nms_threshold, per_class=detector.per_class)
    return detections_frame(found, served.name, served.version)


def utc(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


_TRANSIENT = "transient"  # the one problem all transient errors are logged as


def one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]


class Follower:
    """The version being served, kept current with the registry (module docstring)."""

    def __init__(self, uri: str, load: Callable[[str], Served], poll_seconds: float,
                 gate: AbstractContextManager, log: Callable[[str], None] | None = None):
        self.uri, self.poll_seconds, self.gate = uri, poll_seconds, gate
        self._load_uri = load
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        name, alias, _ = registered_parts(uri) or (None, None, None)  # a malformed models:/ URI: ValueError
        self.name, self.alias = name, alias  # the alias followed; None: a fixed model
        self.current: Served | None = None     # what requests read: replaced whole, never changed
        self.alias_version: int | None = None  # what the alias named at the last poll that reached the registry
        self.last_poll: float | None = None
        self.error: str | None = None           # the last poll's error; None when it succeeded
        self._logged: str | None = None         # the problem last logged (TRANSIENT for any transient error)
        self._refused: dict[int, str] = {}      # versions that failed to load or detect, not transiently
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """The first load (here: with a reachable registry the model is ready when this returns), then polling."""
        self.poll()
        self._thread = threading.Thread(target=self._run, name="ssd-serve-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if self.alias is None and self.current is not None:
                return  # a fixed model, loaded: nothing to follow
            self.poll()

    def poll(self) -> None:
        """One poll; never raises (the error is kept and logged once)."""
        try:
            self._poll()
            error = problem = None
        except Exception as exc:  # a registry or a model can fail in any way: the server keeps serving
            error = one_line(exc)
            problem = _TRANSIENT if is_transient(exc) else error
        self.last_poll = time.time()
        if problem != self._logged:
            serving = f"serving version {self.current.version or self.current.detector.source.uri}" \
                if self.current else "no model loaded"
            self._log(f"ssd serve: poll failed ({serving}): {error}" if error else "ssd serve: poll ok again")
        self.error, self._logged = error, problem

    def _poll(self) -> None:
        if self.alias is None:
            if self.current is None:
                self._swap(*self._checked(self.uri))
            return
        version = resolve(self.uri).version
        self.alias_version = version
        if self.current is not None and self.current.version == str(version):
            return
        if version in self._refused:
            raise RuntimeError(self._refused[version])
        try:
            served, seconds = self._checked(version_uri(self.name, version))
        except Exception as exc:
            if not is_transient(exc):
                self._refused[version] = f"{self.uri} names version {version}, not served: {one_line(exc)}"
                raise RuntimeError(self._refused[version]) from None
            raise
        source = served.detector.source._replace(uri=self.uri, alias=self.alias)
        self._swap(served._replace(detector=served.detector._replace(source=source)), seconds)

    def _checked(self, uri: str) -> tuple[Served, float]:
        """``uri`` loaded and detecting on a generated image (anything else raises), and the seconds it took."""
        start = time.monotonic()
        served = self._load_uri(uri)
        score(served, [example_png()], 0.0, self.gate)
        return served._replace(loaded_at=time.time()), time.monotonic() - start

    def _swap(self, served: Served, seconds: float) -> None:
        was = self.current
        self.current = served  # the swap: requests that read the old reference keep it to the end
        self._log(f"ssd serve: serving {served.detector.source.uri} (version {served.version or '-'}"
                  f"{f', was {was.version}' if was else ''}), loaded and checked in {seconds:.1f} s")

    def status(self) -> dict[str, Any]:
        """What ``/health`` answers: the version served (None before the first load) and the last poll."""
        served = self.current
        model = None
        if served is not None:
            source = served.detector.source
            model = {"uri": source.uri, "name": served.name, "version": served.version, "alias": source.alias,
                     "run_id": source.run_id, "loaded_at": utc(served.loaded_at)}
        return {"status": "ok" if served is not None else "unavailable", "model": model, "follows": self.uri,
                "alias_version": self.alias_version, "poll_seconds": self.poll_seconds,
                "last_poll": utc(self.last_poll), "last_poll_error": self.error}
