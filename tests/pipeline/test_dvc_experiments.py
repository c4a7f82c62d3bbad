"""DVC experiments compare: ``dvc exp show``, ``dvc metrics diff`` and ``dvc plots diff`` see ``main``
and every experiment with its own metrics and plots, because the small reports are ``cache: false``
outputs that git tracks (the big ones are cached by DVC).

One module fixture builds a temporary copy of the project with a tiny generated dataset (16 + 8
images of 160 px, one epoch), commits a baseline ``dvc repro`` on ``main``, then runs two workspace
experiments: one retrains (``train.lr``), one only re-evaluates (``evaluate.threshold``).
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from project_copy import copy_project, git_init, project_env, sh

pytestmark = pytest.mark.slow

# Tiny but complete (as TINY in test_flows.py); the generator's minimum image size is 150.
TINY = ["data.source=synthetic", "data.synthetic.train=16", "data.synthetic.val=8", "data.image_size=160",
        "train.epochs=1", "train.batch_size=8", "evaluate.gallery_images=2"]
EXPERIMENTS = {"lower-lr": "train.lr=0.1", "threshold-05": "evaluate.threshold=0.5"}
REVISIONS = ["main", *EXPERIMENTS]
IN_GIT = ["data/reports/validation.json", "models/mlflow_run.json", "reports/train.json",
          "reports/train_history.csv", "reports/train_curve.png", "reports/eval.json", "reports/pr_curve.csv",
          "reports/pictures/pr_curve.png", "reports/registration.json"]
IN_DVC_CACHE = ["data/raw", "data/reports/samples.png", "models/model.pt", "models/checkpoints",
                "reports/pictures/gallery.png"]
METRICS = {"reports/eval.json": "map_50", "reports/train.json": "class_err"}
IMAGE_PLOTS = ["reports/train_curve.png", "reports/pictures/pr_curve.png", "reports/pictures/gallery.png"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """``(repo, env)``: the baseline committed on main, then each experiment run in the workspace from main."""
    from ssd.util.params import load_params

    root = tmp_path_factory.mktemp("experiments")
    repo = copy_project(root / "repo")
    params = load_params(repo / "params.yaml", TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(repo, root)
    git_init(repo, env)
    seconds = {}
    started = time.monotonic()
    sh("dvc", "repro", cwd=repo, env=env)
    seconds["dvc repro"] = time.monotonic() - started
    sh("git", "add", "-A", cwd=repo, env=env)  # as a user would: whatever git does not ignore
    sh("git", "commit", "-q", "-m", "baseline", cwd=repo, env=env)
    for name, override in EXPERIMENTS.items():
        started = time.monotonic()
        # A workspace run starts from the workspace, which holds the last experiment: go back to main.
        sh("dvc", "exp", "apply", "main", cwd=repo, env=env)
        sh("dvc", "exp", "run", "-n", name, "-S", override, cwd=repo, env=env)
        seconds[f"dvc exp run {name}"] = time.monotonic() - started
    print("\n" + ", ".join(f"{step}: {s:.1f} s" for step, s in seconds.items()))
    return repo, env


def dvc_json(*args: str, repo: Path, env: dict):
    """The JSON that ``dvc *args`` prints on stdout (its warnings go to stderr)."""
    run = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"dvc {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout)


def exp_rows(repo: Path, env: dict) -> dict[str, dict]:
    """``dvc exp show --json`` as ``{name: data}``: the workspace, the baseline commit and each experiment."""
    rows = {}
    for entry in dvc_json("exp", "show", "--json", repo=repo, env=env):
        rows[entry["name"] or entry["rev"]] = entry["data"]
        for experiment in entry.get("experiments") or []:
            for rev in experiment["revs"]:
                rows[rev["name"]] = rev["data"]
    return rows


def metric(data: dict, path: str, key: str):
    """One metric of an ``exp_rows`` row; None when DVC could not read the file for that revision."""
    return ((data.get("metrics") or {}).get(path) or {}).get("data", {}).get(key)


def test_baseline_commit_holds_small_outputs_and_not_cached_ones(project):
    repo, env = project
    tracked = set(sh("git", "ls-files", cwd=repo, env=env).split())
    assert set(IN_GIT) <= tracked, sorted(set(IN_GIT) - tracked)
    assert not {name for name in tracked for out in IN_DVC_CACHE if name == out or name.startswith(out + "/")}
    for out in IN_DVC_CACHE:
        assert (repo / out).exists() and sh("git", "check-ignore", out, cwd=repo, env=env).strip() == out
    # The root .gitignore already ignores them, so DVC added no .gitignore entries of its own.
    committed = sh("git", "diff", "--name-only", "main~1", "main", cwd=repo, env=env).split()
    assert "dvc.lock" in committed and not [name for name in committed if name.endswith(".gitignore")]


def test_exp_show_has_metrics_for_main_and_every_experiment(project):
    repo, env = project
    rows = exp_rows(repo, env)
    assert set(REVISIONS) <= set(rows), list(rows)
    for rev in REVISIONS:
        for path, key in METRICS.items():
            assert isinstance(metric(rows[rev], path, key), float), (rev, path, rows[rev].get("metrics"))
    lr = {rev: rows[rev]["params"]["params.yaml"]["data"]["train"]["lr"] for rev in REVISIONS}
    assert lr["lower-lr"] == 0.1 != lr["main"] == lr["threshold-05"]
    assert metric(rows["threshold-05"], "reports/eval.json", "threshold") == 0.5
    # Re-evaluating reused main's training: same train metrics; retraining gave its own.
    loss = {rev: metric(rows[rev], "reports/train.json", "loss") for rev in REVISIONS}
    assert loss["threshold-05"] == loss["main"] != loss["lower-lr"]


def test_metrics_diff_between_main_and_an_experiment(project):
    repo, env = project
    diff = dvc_json("metrics", "diff", "main", "lower-lr", "--all", "--json", repo=repo, env=env)
    for path, key in METRICS.items():
        change = diff[path][key]
        assert isinstance(change["old"], float) and isinstance(change["new"], float), (path, change)
    changed = dvc_json("metrics", "diff", "main", "threshold-05", "--json", repo=repo, env=env)
    threshold = changed["reports/eval.json"]["threshold"]
    assert threshold["new"] == 0.5 != threshold["old"] and threshold["diff"] == pytest.approx(0.5 - threshold["old"])


def test_plots_diff_draws_every_revision(project, tmp_path):
    repo, env = project
    plots = dvc_json("plots", "diff", *REVISIONS, "--json", "-o", str(tmp_path / "plots"), repo=repo, env=env)
    assert not plots.get("errors"), plots["errors"]
    data = plots["data"]
    for name in ("reports/train_history.csv", "reports/pr_curve.csv"):
        (plot_id,) = [key for key in data if key.endswith(name)]  # drawn once, not once per declaration
        (vega,) = data[plot_id]
        assert vega["type"] == "vega" and vega["revisions"] == REVISIONS
        assert {row["rev"] for row in vega["content"]["data"]["values"]} == set(REVISIONS)
    for name in IMAGE_PLOTS:  # one picture per revision, the cached gallery included
        images = data[name]
        assert [image["revisions"] for image in images] == [[rev] for rev in REVISIONS]
        assert all(Path(image["url"]).stat().st_size > 0 for image in images)


def test_exp_apply_restores_a_consistent_workspace(project):
    """Applying an experiment brings back its model, checkpoints and MLflow run id together, so
    nothing is left to reproduce; every run id in git is a finished run of the project's MLflow store."""
    import mlflow
    import torch

    repo, env = project
    rows = exp_rows(repo, env)
    runs = {rev: json.loads(sh("git", "show", f"{rows[rev]['rev']}:models/mlflow_run.json", cwd=repo, env=env))
            ["run_id"] for rev in REVISIONS}
    assert runs["threshold-05"] == runs["main"] != runs["lower-lr"]  # only lower-lr trained again
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert all(client.get_run(run_id).info.status == "FINISHED" for run_id in runs.values())

    sh("dvc", "exp", "apply", "lower-lr", cwd=repo, env=env)
    status = dvc_json("status", "--json", repo=repo, env=env)
    assert all(changes == ["always changed"] for changes in status.values()), status  # nothing to reproduce
    assert json.loads((repo / "models/mlflow_run.json").read_text())["run_id"] == runs["lower-lr"]
    (checkpoint,) = (repo / "models/checkpoints").glob("*.pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["params"]["train"]["lr"] == 0.1 and saved["mlflow_run_id"] == runs["lower-lr"]
