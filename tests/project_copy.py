"""A temporary copy of this project as its own git repository, for tests that run real DVC and git.

The copy holds this checkout's tracked and untracked-but-not-ignored files (so uncommitted work is
tested too), minus every output that ``dvc.yaml`` declares: reports and run records that a local
``dvc repro`` left in the working tree are visible to git on purpose, but a test starts from none.
Commands run on the copy's own code (``PYTHONPATH``), not on the editable install's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def pipeline_outputs(dvc_yaml: Path = REPO / "dvc.yaml") -> set[str]:
    """Every path declared as ``outs``, ``metrics`` or ``plots`` of a stage in ``dvc_yaml``."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    paths = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                paths.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def copy_project(dest: Path) -> Path:
    """Copy the working tree's files (not the pipeline's outputs) into ``dest``; returns ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    outputs = [Path(out) for out in pipeline_outputs()]
    for name in filter(None, files):
        src = REPO / name
        if not src.is_file() or any(out == Path(name) or out in Path(name).parents for out in outputs):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    return dest


def project_env(root: Path, scratch: Path) -> dict[str, str]:
    """Environment for ``dvc``/``ssd``/``git`` in the copy at ``root``; ``scratch`` holds DVC's site cache."""
    return {**os.environ, "PYTHONPATH": str(root), "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(scratch / "dvc-site-cache"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(*cmd: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run ``cmd``; fail the test with its output unless it exits 0. Returns stdout + stderr."""
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout + run.stderr


def git_init(root: Path, env: dict[str, str], message: str = "copy") -> None:
    """Make ``root`` a git repository on branch ``main`` with everything in it committed."""
    sh("git", "init", "-q", "-b", "main", cwd=root, env=env)
    # DVC commits experiments through its own git backend, which reads the identity from the config.
    sh("git", "config", "user.name", "t", cwd=root, env=env)
    sh("git", "config", "user.email", "t@t", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-q", "-m", message, cwd=root, env=env)
