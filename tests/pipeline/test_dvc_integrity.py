"""What a DVC remote hands back is checked: a flipped byte in the project's default remote makes
`dvc pull` fail instead of placing the corrupted file in data/raw (the remote's `verify`)."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from project_copy import copy_project, git_init, project_env, sh

pytestmark = pytest.mark.slow


def test_a_corrupted_object_in_the_remote_is_refused_by_pull(tmp_path):
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "synthetic"
    params["data"]["synthetic"].update(train=4, val=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(repo, tmp_path)
    git_init(repo, env)
    sh("dvc", "repro", "fetch", cwd=repo, env=env)
    sh("dvc", "push", "fetch", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "lock", cwd=repo, env=env)

    # the largest object of the remote is an image: flip one byte in its middle
    remote = tmp_path / "ssd-dvc-remote"
    victim = max((p for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".dir")),
                 key=lambda p: p.stat().st_size)
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    pull = subprocess.run(["dvc", "pull", "fetch"], cwd=clone, env={**env, "PYTHONPATH": str(clone)},
                          capture_output=True, text=True, timeout=300)
    assert pull.returncode != 0, pull.stdout + pull.stderr
    pulled = [p.read_bytes() for p in (clone / "data/raw").rglob("*.png")] if (clone / "data/raw").exists() else []
    assert bytes(data) not in pulled  # the corrupted bytes never reach the workspace
