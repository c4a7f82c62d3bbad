"""The checkpoints of a flow run that did not finish, kept for the next run with the same params.

A run that is cancelled, fails or crashes saves no DVC experiment, and its workspace is removed;
its training checkpoints (``models/checkpoints``, cached by DVC only when the train stage ends) are
first moved to ``.dvc/tmp/flow-checkpoints/<commit>-<params digest>/`` in the project (ignored by
git and DVC). The key is what :func:`flows.workspace.continue_from_experiment` matches an
experiment on: the workspace's ``HEAD`` and its whole ``params.yaml``. The next run whose
workspace has the same key takes them, by a rename (so one run only: two runs never train from
the same checkpoint at once), into its own ``models/checkpoints`` before the stages run, and its
training resumes from the newest one (``ssd.engine.checkpoint`` checks params, code and data) in
the stopped run's MLflow run. A run that completes drops what is kept under its key; at most
:data:`KEEP` keys are kept, the least recently kept go first.

Every change to the kept folders happens under one lock (``flow-checkpoints.lock``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from ssd.data.layout import CHECKPOINT_DIR
from ssd.util.files import lock_file, waiting_lock

KEPT_DIR = Path(".dvc/tmp/flow-checkpoints")  # in the project, beside the runs' workspaces
KEEP = 4                # keys kept at most (each holds the trainer's last checkpoints, a few MB)
TRAINING_WAIT_S = 20.0  # a stopped training's last seconds (it ends its MLflow run): under Prefect's 30 s grace
LOCK_WAIT_S = 60.0      # another run moving kept checkpoints: a rename or two


def resume_key(workspace: Path) -> str:
    """``<HEAD commit>-<sha256 of params.yaml, 16 hex digits>`` of ``workspace``."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True,
                          check=True).stdout.strip()
    return f"{head}-{hashlib.sha256((workspace / 'params.yaml').read_bytes()).hexdigest()[:16]}"


def kept_folder(project: Path, workspace: Path) -> Path:
    """Where the checkpoints of a stopped run with ``workspace``'s commit and params are kept."""
    return project / KEPT_DIR / resume_key(workspace)


def keep_checkpoints(project: Path, workspace: Path, log: Callable[[str], None] = print,
                     wait_s: float = TRAINING_WAIT_S) -> Path | None:
    """Move ``workspace``'s checkpoints to :func:`kept_folder`; returns it, or None when there were none.

    Waits up to ``wait_s`` for the training to let go of them (``LockHeld`` after: it still runs).
    Where a folder is kept already for the key, the one whose newest checkpoint is later stays.
    """
    source = workspace / CHECKPOINT_DIR
    with waiting_lock(lock_file(source), wait_s):  # the training's own lock: held until it has exited
        if not source.is_dir() or not any(source.iterdir()):
            return None
        target = kept_folder(project, workspace)
        with waiting_lock(lock_file(project / KEPT_DIR), LOCK_WAIT_S):
            if target.is_dir() and _newest(target) > _newest(source):
                log(f"checkpoints not kept: {target} holds later ones")
                return target
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)  # the same file system: the project holds both
            os.utime(target)           # the order in which folders were kept (see _prune)
            _prune(project / KEPT_DIR)
    log(f"checkpoints kept for the next run with these params: {target} ({', '.join(_names(target))})")
    return target


def claim_checkpoints(project: Path, workspace: Path, log: Callable[[str], None] = print) -> list[str]:
    """Take the checkpoints kept for ``workspace``'s key into its ``models/checkpoints`` (replacing the
    ones checked out there); returns their file names (none: nothing was kept)."""
    source, target = kept_folder(project, workspace), workspace / CHECKPOINT_DIR
    with waiting_lock(lock_file(project / KEPT_DIR), LOCK_WAIT_S):
        if not source.is_dir():
            return []
        shutil.rmtree(target, ignore_errors=True)  # links into the DVC cache: nothing is lost
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
    names = _names(target)
    log(f"resuming from the checkpoints a stopped run kept: {', '.join(names)}")
    return names


def drop_kept(project: Path, workspace: Path) -> None:
    """Forget the checkpoints kept for ``workspace``'s key (its run completed: the next run with these
    params continues from its experiment instead)."""
    with waiting_lock(lock_file(project / KEPT_DIR), LOCK_WAIT_S):
        shutil.rmtree(kept_folder(project, workspace), ignore_errors=True)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _newest(folder: Path) -> str:
    """The name of the newest checkpoint (the trainer's names sort by epoch)."""
    return max(_names(folder), default="")


def _prune(kept: Path) -> None:
    folders = sorted((p for p in kept.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
