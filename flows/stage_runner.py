"""Running one ``dvc.yaml`` stage for the flow: ``dvc repro --single-item`` in a subprocess.

The stage's output is streamed line by line to a log callback; what happened is read from files,
never from DVC's English: the stage's ``ssd`` command writes its exit status to the file named by
``SSD_EXIT_STATUS_FILE`` (DVC itself exits 255 whatever the command's status), and ``dvc.lock``
records whether the stage's dependencies moved:

=============  ====================================================================
``ran``        the stage's command ran (it reported a status)
``restored``   its command did not run, but its ``dvc.lock`` entry changed: DVC restored the
               outputs from its run cache
``skipped``    neither: nothing the stage depends on changed
=============  ====================================================================

A flow that is stopped (a Prefect Cancel, Ctrl-C) stops its running stage first: one SIGTERM to
the stage's process group, its last output read, SIGKILL to what is left after
:data:`STOP_DRAIN_S` (``_stop``).
"""
from __future__ import annotations

import contextlib
import io
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import yaml

from ssd.util.errors import EXIT_STATUS_ENV, EXIT_TEMPFAIL

RAN, RESTORED, SKIPPED = "ran", "restored", "skipped"
# Stages run right before another, inside the same (retried) task: fetch's only upstream stage is
# `source`, the always-run fingerprint of the data source that decides whether fetch reruns.
UPSTREAM = {"fetch": ("source",)}
TAIL_LINES = 15
STOP_DRAIN_S = 20.0  # a stopped stage's last output is read this long at most (Prefect's grace: 30 s)


class StageFailed(RuntimeError):
    """A pipeline stage exited non-zero; the message names the stage and ends with its stderr tail.
    ``exit_status``: the status its ``ssd`` command reported (None if it reported none)."""

    def __init__(self, stage: str, tail: str, exit_status: int | None = None):
        super().__init__(f"stage {stage!r} failed: {tail}")
        self.stage, self.tail, self.exit_status = stage, tail, exit_status


class TransientStageFailure(StageFailed):
    """A stage whose command exited 75 (``EX_TEMPFAIL``): it may succeed when retried."""


def stage_env() -> dict[str, str]:
    """The environment for stage subprocesses: this interpreter's ``bin`` first on PATH (so ``dvc``,
    ``ssd`` and ``torchrun`` in ``dvc.yaml`` are the ones installed beside it), unbuffered output so
    lines arrive as they are printed, and no progress bars (they are one endless line in a log)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


def run_stage(stage: str, project_dir: str | Path, log: Callable[[str], None] = print,
              env: dict[str, str] | None = None) -> str:
    """Run ``stage`` (after its :data:`UPSTREAM` stages) in ``project_dir``, passing each output line
    to ``log``; returns :data:`RAN`, :data:`RESTORED` or :data:`SKIPPED` for ``stage`` itself.
    ``env``: variables for the stage's commands beyond :func:`stage_env`'s.

    Raises ``TransientStageFailure`` when a stage fails and its command exited 75, else
    ``StageFailed`` naming ``stage`` (also for an upstream stage's failure: it is part of this one's
    task), with the last lines of stderr.
    """
    env = {**stage_env(), **(env or {})}
    for upstream in UPSTREAM.get(stage, ()):
        _run_one(upstream, Path(project_dir), log, stage, env)
    return _run_one(stage, Path(project_dir), log, stage, env)


def _run_one(stage: str, project: Path, log: Callable[[str], None], label: str, env: dict[str, str]) -> str:
    before = _lock_entry(project, stage)
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    with tempfile.TemporaryDirectory(prefix="ssd-stage-") as tmp:
        status_file = Path(tmp) / "exit_status"
        tails, returncode = _stream(command, project, {**env, EXIT_STATUS_ENV: str(status_file)}, log)
        status = _read_status(status_file)
    if returncode != 0:
        tail = "\n".join(tails["stderr"] or tails["stdout"]) or f"exit status {returncode}"
        raise (TransientStageFailure if status == EXIT_TEMPFAIL else StageFailed)(label, tail, status)
    if status is not None:
        return RAN
    return RESTORED if _lock_entry(project, stage) != before else SKIPPED


def _lock_entry(project: Path, stage: str) -> Any:
    """The stage's entry in ``dvc.lock`` (its deps', params' and outs' hashes), None if it has none."""
    lock = project / "dvc.lock"
    data = yaml.safe_load(lock.read_text()) if lock.is_file() else None
    return ((data or {}).get("stages") or {}).get(stage)


def _read_status(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # the command never got to report (DVC skipped it, or it was killed)
        return None


def _pump(stream: io.TextIOBase, name: str, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((name, line.rstrip("\n")))
    lines.put((name, None))


def _stream(command: list[str], cwd: Path, env: dict[str, str],
            log: Callable[[str], None]) -> tuple[dict[str, deque], int]:
    """Run ``command``, passing each output line to ``log``; ``(stdout/stderr tails, exit status)``.

    The command runs in a process group of its own, which this function stops when it is itself
    stopped (:func:`_stop`): a Prefect Cancel signals the flow run's process alone when the
    deployment is served, its whole group on a worker; either way each process of the stage gets
    one SIGTERM, from here.
    """
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, start_new_session=True)
    # Two reader threads feed one queue so neither pipe can fill up and block the stage; logging
    # stays in this (the task's) thread.
    lines: queue.Queue = queue.Queue()
    for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        threading.Thread(target=_pump, args=(stream, name, lines), daemon=True).start()
    tails = {"stdout": deque(maxlen=TAIL_LINES), "stderr": deque(maxlen=TAIL_LINES)}
    open_streams = [2]
    try:
        _read(lines, tails, open_streams, log)
    except BaseException:
        _stop(proc, lambda deadline: _read(lines, tails, open_streams, log, deadline))
        raise
    return tails, proc.wait()


def _stop(proc: subprocess.Popen, read_until: Callable[[float], None]) -> None:
    """Stop a stage whose flow is stopping: SIGTERM to its process group (``torchrun`` passes it to
    its workers), its output read until every process has closed it (:data:`STOP_DRAIN_S` at most:
    a process whose reader is gone fails on its next line, and MLflow prints one before it records
    the training's run KILLED), then SIGKILL to whatever of its process tree is left."""
    import psutil  # a dependency of DVC's

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGTERM)
    except (psutil.NoSuchProcess, ProcessLookupError):  # it had ended
        tree = []
    read_until(time.monotonic() + STOP_DRAIN_S)
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()  # psutil checks that the pid is still this process, not a new one
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _read(lines: queue.Queue, tails: dict[str, deque], open_streams: list[int], log: Callable[[str], None],
          deadline: float | None = None) -> None:
    """Log the queued lines until both streams have ended (or ``deadline``, a ``time.monotonic()``)."""
    while open_streams[0]:
        try:
            name, line = lines.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return
        if line is None:
            open_streams[0] -= 1
            continue
        log(line)
        if line.strip():
            tails[name].append(line)
