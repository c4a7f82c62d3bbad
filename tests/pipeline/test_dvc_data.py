"""The fetch and validate stages under real DVC in a temporary copy of the repository, offline:
``dvc repro validate`` falls back to generated bananas, and ``dvc push``/``dvc pull`` through the
default local remote restore identical files in a second clone."""
from __future__ import annotations

import json

import pytest
import yaml

from archive_helpers import closed_port_url, tree_hash
from project_copy import copy_project, git_init, project_env, sh

pytestmark = pytest.mark.slow


def test_repro_offline_then_push_pull_roundtrip(tmp_path):
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="auto", url=closed_port_url())  # an unreachable "real" URL: offline
    params["data"]["synthetic"].update(train=16, val=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(repo, tmp_path)
    git_init(repo, env)

    log = sh("dvc", "repro", "validate", cwd=repo, env=env)
    assert "SYNTHETIC" in log
    manifest = json.loads((repo / "data/raw/manifest.json").read_text())
    assert manifest["synthetic_fallback"] and manifest["files"]["bananas_train"]["images"] == 16
    report = json.loads((repo / "data/reports/validation.json").read_text())
    assert report["problems"] == [] and report["splits"]["val"]["images"] == 8
    assert "data/raw" not in sh("git", "ls-files", cwd=repo, env=env)  # DVC's, not git's
    assert "up to date" in sh("dvc", "status", "validate", cwd=repo, env=env)

    sh("dvc", "push", "fetch", "validate", cwd=repo, env=env)
    assert (tmp_path / "ssd-dvc-remote" / "files").is_dir()     # the default remote: ../ssd-dvc-remote
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "lock", cwd=repo, env=env)

    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    assert not (clone / "data/raw").exists()
    sh("dvc", "pull", "fetch", "validate", cwd=clone, env={**env, "PYTHONPATH": str(clone)})
    for out in ("data/raw", "data/reports"):
        assert tree_hash(clone / out) == tree_hash(repo / out) != ""
    assert "up to date" in sh("dvc", "status", "validate", cwd=clone, env={**env, "PYTHONPATH": str(clone)})
