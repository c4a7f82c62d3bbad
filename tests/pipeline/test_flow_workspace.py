"""A flow run's own workspace: a git worktree sharing the DVC cache, published as a DVC experiment;
the deployment's checkout is never edited. Real git and DVC, no Prefect (tests/test_flows.py runs
the whole flow)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from flows.params_file import write_params
from flows.stage_runner import RAN, run_stage
from flows.workspace import RUNS_DIR, experiment_name, publish, remove_abandoned, run_workspace
from project_copy import copy_project, git_init, project_env, sh
from ssd.util.files import exclusive_lock

pytestmark = pytest.mark.slow

SMALL = ["data.source=synthetic", "data.synthetic.train=4", "data.synthetic.val=2", "data.image_size=160"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = copy_project(tmp_path / "project")
    (root / "dvc.lock").unlink()  # these runs reproduce fetch and validate only: a lock naming no other stage
    env = project_env(root, tmp_path)
    git_init(root, env)
    for key in ("PYTHONPATH", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS"):
        monkeypatch.setenv(key, env[key])
    return root


def checkout_state(root) -> tuple[str, str]:
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    return status, (root / "params.yaml").read_text()


def validate_in_workspace(project, name: str, seed: int) -> dict:
    with run_workspace(project, name, log=lambda line: None) as ws:
        write_params(ws / "params.yaml", SMALL + [f"data.synthetic.seed={seed}"])
        outcomes = {s: run_stage(s, ws, log=lambda line: None) for s in ("fetch", "validate")}
        published = publish(ws, name, ("source", *outcomes), log=lambda line: None)
        return {"outcomes": outcomes, "published": published, "workspace": ws}


def exp_show(root) -> dict[str, dict]:
    """``dvc exp show --json``: each experiment's name -> its params.yaml section ``data``."""
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root,
                                      capture_output=True, text=True, check=True).stdout)
    found = {}
    for base in shown:
        for exp in base.get("experiments") or []:
            rev = exp["revs"][0]
            found[exp.get("name") or rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]["data"]
    return found


def test_two_runs_at_once_keep_their_params_and_leave_the_checkout_untouched(project):
    before = checkout_state(project)
    results = {}
    threads = [threading.Thread(target=lambda n=n, s=s: results.setdefault(n, validate_in_workspace(project, n, s)))
               for n, s in (("run-a", 1), ("run-b", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {"run-a", "run-b"}, "a run failed (see the thread's traceback above)"
    assert all(r["outcomes"] == {"fetch": RAN, "validate": RAN} for r in results.values())
    assert checkout_state(project) == before  # not a byte of the deployment's checkout changed
    assert not any(r["workspace"].exists() for r in results.values())  # workspaces removed
    shown = exp_show(project)
    assert shown["run-a"]["synthetic"]["seed"] == 1 and shown["run-b"]["synthetic"]["seed"] == 2
    assert results["run-a"]["published"]["rev"] != results["run-b"]["published"]["rev"]


def test_a_second_clone_sees_pushed_experiments_and_pulls_their_data(project, tmp_path):
    origin = tmp_path / "origin.git"
    sh("git", "clone", "-q", "--bare", str(project), str(origin), cwd=tmp_path, env=None)
    sh("git", "remote", "add", "origin", str(origin), cwd=project, env=None)
    published = validate_in_workspace(project, "weekly-1", 3)["published"]
    assert published["ref_pushed"] and published["data_pushed"]

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path, env=None)
    sh(sys.executable, "-m", "dvc", "exp", "pull", "origin", "weekly-1", cwd=clone, env=None)
    assert exp_show(clone)["weekly-1"]["synthetic"]["seed"] == 3
    # docs/orchestration.md's recipe: the experiment as a branch, then its data from the DVC remote
    sh(sys.executable, "-m", "dvc", "exp", "branch", "weekly-1", "run-weekly-1", cwd=clone, env=None)
    sh("git", "checkout", "-q", "run-weekly-1", cwd=clone, env=None)
    sh(sys.executable, "-m", "dvc", "pull", "validate", cwd=clone, env=None)
    report = json.loads((clone / "data/reports/validation.json").read_text())
    assert report["splits"]["train"]["images"] == 4


def test_an_abandoned_workspace_is_removed_by_the_next_run_and_a_live_one_is_not(project):
    dead, live = project / RUNS_DIR / "killed", project / RUNS_DIR / "running"
    for path in (dead, live):
        sh("git", "worktree", "add", "-q", "--detach", str(path), "HEAD", cwd=project, env=None)
        path.with_suffix(".lock").touch()
    with exclusive_lock(live.with_suffix(".lock")):
        assert remove_abandoned(project) == [dead]
        assert live.exists() and not dead.exists()
    assert remove_abandoned(project) == [live]


def test_experiment_names_are_git_ref_safe():
    assert experiment_name("amber-fox") == "amber-fox"
    assert experiment_name("weekly retrain: run #3") == "weekly-retrain-run-3"
    assert experiment_name("..") == "run"
