"""Each flow run in its own workspace: a git worktree of the project at its ``HEAD``.

The deployment's checkout is never edited: a run's params overrides, ``dvc.lock``, reports and
model live in its worktree (under the project's ``.dvc/tmp/flow-runs/``, which git and DVC ignore),
so two runs at once cannot mix params or meet on DVC's workspace lock. The worktree shares the
project's DVC cache (hard links, not copies) and resolves its remotes to the project's.

When the stages are done, :func:`publish` records the run as a DVC experiment named after the flow
run (``dvc exp save``: its params, ``dvc.lock``, metrics and plots on a git ref that every
worktree and clone of the repository can list with ``dvc exp show``), pushes the experiment's data
and model to the DVC remote, and the experiment's ref to the git remote ``origin`` when there is one.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from flows.resume import keep_checkpoints
from ssd.data.layout import CHECKPOINT_DIR
from ssd.util.files import LockHeld, exclusive_lock, lock_file, waiting_lock

RUNS_DIR = Path(".dvc/tmp/flow-runs")  # under the project; .dvc/tmp is ignored by git and by DVC
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "ssd flow", "GIT_AUTHOR_EMAIL": "ssd-flow@localhost",
                "GIT_COMMITTER_NAME": "ssd flow", "GIT_COMMITTER_EMAIL": "ssd-flow@localhost"}
GIT_REMOTE = "origin"


def experiment_name(flow_run_name: str) -> str:
    """A DVC experiment name (a git ref component) for a flow run's name: ``amber-fox`` stays as it is."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", flow_run_name).strip("-.") or "run"
    return name[:100]


@contextmanager
def run_workspace(project: Path, name: str, log: Callable[[str], None] = print) -> Iterator[Path]:
    """A fresh worktree of ``project`` at its ``HEAD`` for the run ``name``; removed on the way out.

    The run holds ``<name>.lock`` beside it while it lives; a killed run cannot remove its worktree,
    and the next run does (any whose lock nobody holds), keeping its checkpoints (``flows.resume``).
    """
    remove_abandoned(project, log)
    path = project / RUNS_DIR / name
    with exclusive_lock(lock_file(path)):
        if path.exists():
            _remove(project, path)
        _run(["git", "worktree", "add", "--detach", str(path), "HEAD"], project)
        try:
            yield _prepared(project, path, log)
        finally:
            _remove(project, path)


def _prepared(project: Path, path: Path, log: Callable[[str], None]) -> Path:
    _share_dvc(project, path)
    # The outputs HEAD's dvc.lock names, from the shared cache: unchanged stages stay skipped.
    _run([sys.executable, "-m", "dvc", "checkout", "--allow-missing", "--quiet"], path, check=False)
    log(f"workspace: {path} (git worktree at HEAD)")
    return path


def publish(workspace: Path, name: str, stages: Sequence[str], log: Callable[[str], None] = print) -> dict[str, object]:
    """Save the workspace, with the outputs of ``stages``, as the DVC experiment ``name``; push its data
    and model to the DVC remote and, when the repository has the git remote ``origin``, the
    experiment's ref (``dvc exp push``)."""
    dvc = [sys.executable, "-m", "dvc"]
    # New small outputs that git keeps (cache: false in dvc.yaml) are not tracked yet: name them.
    new_files = _run(["git", "ls-files", "--others", "--exclude-standard", "-z"], workspace).split("\0")
    include = [arg for path in filter(None, new_files) for arg in ("--include-untracked", path)]
    with _repository_lock(workspace):  # DVC's experiment refs live in the one git directory all worktrees share
        _run([*dvc, "exp", "save", "--force", "--name", name, *include, *stages], workspace,
             env=_git_identity(workspace))
    rev = _run(["git", "rev-parse", f"{_exp_ref(workspace, name)}^{{commit}}"], workspace).strip()
    data_pushed = _has_dvc_remote(workspace) and _run([*dvc, "push", "--quiet"], workspace, check=False) is not None
    ref_pushed = GIT_REMOTE in _run(["git", "remote"], workspace).split() and \
        _run([*dvc, "exp", "push", GIT_REMOTE, name], workspace, check=False) is not None
    log(f"DVC experiment {name} saved ({rev[:7]})" + (f", pushed to {GIT_REMOTE}" if ref_pushed else ""))
    return {"experiment": name, "rev": rev, "data_pushed": data_pushed, "ref_pushed": ref_pushed}


def continue_from_experiment(workspace: Path, log: Callable[[str], None] = print) -> str | None:
    """Continue from the newest experiment on this ``HEAD`` whose ``params.yaml`` equals the workspace's.

    Its tracked files (``dvc.lock``, small reports) and its outputs from the shared cache make the
    workspace what that run left, so stages with unchanged inputs are skipped and training resumes
    from its checkpoints, as ``dvc repro`` in one long-lived checkout would. Returns the experiment's
    name, or None (then the stages start from ``HEAD``'s ``dvc.lock``; DVC's run cache still
    restores what it can).
    """
    head = _run(["git", "rev-parse", "HEAD"], workspace).strip()
    refs = _run(["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)",
                 f"refs/exps/{head[:2]}/{head[2:]}/"], workspace).split()
    params = (workspace / "params.yaml").read_text()
    for ref in refs:
        if _run(["git", "show", f"{ref}:params.yaml"], workspace, check=False) == params:
            _run(["git", "checkout", ref, "--", "."], workspace)
            _run(["git", "reset", "-q"], workspace)  # the files stay; the index goes back to HEAD
            _run([sys.executable, "-m", "dvc", "checkout", "--allow-missing", "--quiet"], workspace, check=False)
            name = ref.rsplit("/", 1)[-1]
            log(f"continuing from DVC experiment {name} (same params on this commit)")
            return name
    return None


def remove_abandoned(project: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove the workspaces of runs that ended without cleaning up (their lock is free), keeping their
    checkpoints for the next run with their params (``flows.resume``); returns them. One whose
    training still runs (an orphan holding the checkpoints' lock) stays."""
    removed = []
    for lock in sorted((project / RUNS_DIR).glob("*.lock")):
        path = lock.with_suffix("")
        try:
            with exclusive_lock(lock):
                if path.exists():
                    with exclusive_lock(lock_file(path / CHECKPOINT_DIR)):  # the training's own lock
                        if (path / "params.yaml").is_file():
                            keep_checkpoints(project, path, log)
                    _remove(project, path)
                    removed.append(path)
            lock.unlink(missing_ok=True)
        except LockHeld:  # a live run's, or its training's
            continue
    _run(["git", "worktree", "prune"], project, check=False)
    return removed


def _share_dvc(project: Path, workspace: Path) -> None:
    """Point the worktree's DVC at the project's cache and remotes (its ``config.local``)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:  # DVC resolves a remote's relative path against the project's .dvc/
        cache = repo.cache.local_cache_dir
        remotes = {name: dict(conf) for name, conf in repo.config["remote"].items()}
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "cache", "dir", "--local", str(cache)], workspace)
    _run([*dvc, "config", "--local", "cache.type", "reflink,hardlink,copy"], workspace)
    for name, conf in remotes.items():
        url = str(conf.get("url", ""))
        if url.startswith("/"):  # a folder remote: the same folder the project uses
            _run([*dvc, "remote", "modify", "--local", name, "url", url], workspace)


def _has_dvc_remote(workspace: Path) -> bool:
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return bool(repo.config["core"].get("remote"))


def _exp_ref(workspace: Path, name: str) -> str:
    """The experiment's git ref (DVC files it under ``refs/exps/`` by its base commit)."""
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], workspace).split()
    return next(r for r in refs if r.rsplit("/", 1)[-1] == name)


def _repository_lock(workspace: Path, wait_s: float = 600.0) -> AbstractContextManager[None]:
    """Wait for, then hold, the lock that serialises experiment saves of one repository."""
    common = Path(_run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], workspace).strip())
    return waiting_lock(common / "ssd-exp-save.lock", wait_s, poll_s=0.5)


def _git_identity(workspace: Path) -> dict[str, str]:
    """The environment for a commit: the machine's git identity, or the flow's own where none is set."""
    configured = _run(["git", "config", "user.email"], workspace, check=False)
    return dict(os.environ) if configured else {**GIT_IDENTITY, **os.environ}


def _remove(project: Path, path: Path) -> None:
    _run(["git", "worktree", "remove", "--force", str(path)], project, check=False)
    shutil.rmtree(path, ignore_errors=True)
    _run(["git", "worktree", "prune"], project, check=False)


def _run(command: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> str | None:
    """``command``'s stdout; with ``check``, a failure raises naming the command and its stderr."""
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        if check:
            raise RuntimeError(f"{' '.join(command[:4])} failed in {cwd}: {run.stderr.strip()[-2000:]}")
        return None
    return run.stdout
