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

import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

RUNS_DIR = Path(".dvc/tmp/flow-runs")  # under the project; .dvc/tmp is ignored by git and by DVC
GIT_REMOTE = "origin"


def experiment_name(flow_run_name: str) -> str:
    """A DVC experiment name (a git ref component) for a flow run's name: ``amber-fox`` stays as it is."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", flow_run_name).strip("-.") or "run"
    return name[:100]


@contextmanager
def run_workspace(project: Path, name: str, log: Callable[[str], None] = print) -> Iterator[Path]:
    """A fresh worktree of ``project`` at its ``HEAD`` for the run ``name``; removed on the way out."""
    prune(project)
    path = project / RUNS_DIR / name
    if path.exists():  # a run of the same name that was killed before it could clean up
        _remove(project, path)
    _run(["git", "worktree", "add", "--detach", str(path), "HEAD"], project)
    try:
        _share_dvc(project, path)
        # The outputs HEAD's dvc.lock names, from the shared cache: unchanged stages stay skipped.
        _run([sys.executable, "-m", "dvc", "checkout", "--allow-missing", "--quiet"], path, check=False)
        log(f"workspace: {path} (git worktree at HEAD)")
        yield path
    finally:
        _remove(project, path)


def publish(workspace: Path, name: str, log: Callable[[str], None] = print) -> dict[str, object]:
    """Save the workspace as the DVC experiment ``name``; push its data and, with a git remote, its ref."""
    _run([sys.executable, "-m", "dvc", "exp", "save", "--force", "--name", name], workspace)
    rev = _run(["git", "rev-parse", f"refs/exps/{_exp_ref(workspace, name)}"], workspace).strip() \
        if _exp_ref(workspace, name) else None
    pushed_data = _has_dvc_remote(workspace) and \
        _run([sys.executable, "-m", "dvc", "push", "--quiet"], workspace, check=False) is not None
    remotes = _run(["git", "remote"], workspace).split()
    pushed_ref = GIT_REMOTE in remotes and _run(
        [sys.executable, "-m", "dvc", "exp", "push", GIT_REMOTE, name], workspace, check=False) is not None
    log(f"experiment {name} saved" + (f", ref pushed to {GIT_REMOTE}" if pushed_ref else ""))
    return {"experiment": name, "rev": rev, "data_pushed": bool(pushed_data), "ref_pushed": bool(pushed_ref)}


def prune(project: Path) -> None:
    """Forget worktrees whose folders are gone (a run killed before its cleanup ran)."""
    _run(["git", "worktree", "prune"], project, check=False)


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


def _exp_ref(workspace: Path, name: str) -> str | None:
    """The experiment's ref under ``refs/exps/`` (DVC files it by base commit), or None."""
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], workspace).split()
    found = [r for r in refs if r.rsplit("/", 1)[-1] == name]
    return found[-1].removeprefix("refs/exps/") if found else None


def _remove(project: Path, path: Path) -> None:
    _run(["git", "worktree", "remove", "--force", str(path)], project, check=False)
    shutil.rmtree(path, ignore_errors=True)
    prune(project)


def _run(command: list[str], cwd: Path, check: bool = True) -> str | None:
    """``command``'s stdout; with ``check``, a failure raises naming the command and its stderr."""
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        if check:
            raise RuntimeError(f"{' '.join(command[:4])} failed in {cwd}: {run.stderr.strip()[-2000:]}")
        return None
    return run.stdout
