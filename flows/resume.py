"""The checkpoints of a flow run that did not finish, kept for the next run with the same params.

A run that is cancelled, fails or crashes saves no DVC experiment, and its workspace is removed;
its training checkpoints (``models/checkpoints``, cached by DVC only when the train stage ends) are
first kept (hard links, no copies) in ``.dvc/tmp/flow-checkpoints/<commit>-<params digest>/`` of
the project (ignored by git and DVC). The key is what :func:`flows.workspace.continue_from_experiment` matches an
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
import tempfile
from pathlib import Path
from typing import Callable

from ssd.data.layout import CHECKPOINT_DIR
from ssd.util.files import lock_file, waiting_lock

KEPT_DIR = Path(".dvc/tmp/flow-checkpoints")  # in the project, beside the runs' workspaces
KEEP = 4                # keys kept at most (each holds the trainer's last checkpoints, a few MB)
LOCK_WAIT_S = 60.0      # another run moving kept checkpoints: a rename or two


def resume_key(workspace: Path) -> str:
    """``<HEAD commit>-<sha256 of params.yaml, 16 hex digits>`` of ``workspace``."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True,
                          check=True).stdout.strip()
    return f"{head}-{hashlib.sha256((workspace / 'params.yaml').read_bytes()).hexdigest()[:16]}"


def kept_folder(project: Path, workspace: Path) -> Path:
    """Where the checkpoints of a stopped run with ``workspace``'s commit and params are kept."""
    return project / KEPT_DIR / resume_key(workspace)


def keep_checkpoints(project: Path, workspace: Path, log: Callable[[str], None] = print) -> Path | None:
    """Keep ``workspace``'s checkpoints in :func:`kept_folder`; returns it, or None when there were none.

    The files are hard-linked (no copy), at once: a training that is stopping may still be ending
    its MLflow run, but it writes every checkpoint atomically (a ``.tmp-*`` file, then a rename),
    so each file taken is whole. Where a folder is kept already for the key, the one whose newest
    checkpoint is later stays.
    """
    source = workspace / CHECKPOINT_DIR
    files = sorted(p for p in source.glob("*") if not p.name.startswith(".")) if source.is_dir() else []
    if not files:
        return None
    target = kept_folder(project, workspace)
    with waiting_lock(lock_file(project / KEPT_DIR), LOCK_WAIT_S):
        if target.is_dir() and _newest(target) > files[-1].name:
            log(f"checkpoints not kept: {target} holds later ones")
            return target
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=_made(project / KEPT_DIR)))
        for file in files:
            try:
                os.link(file, incoming / file.name)  # the same file system: the project holds both
            except FileNotFoundError:  # pruned by the training meanwhile: a later one is there
                continue
        shutil.rmtree(target, ignore_errors=True)
        os.rename(incoming, target)
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


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _newest(folder: Path) -> str:
    """The name of the newest checkpoint (the trainer's names sort by epoch)."""
    return max(_names(folder), default="")


def _prune(kept: Path) -> None:
    # A folder's mtime: when it was kept (its files were linked into it then)
    folders = sorted((p for p in kept.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
