"""The checkpoints of a flow run that did not finish, kept for the next run with the same params on
the same commit (flows/resume.py): real git worktrees, no DVC or Prefect (test_flow_cancel.py
cancels a real deployment run)."""
from __future__ import annotations

import subprocess

import pytest

from flows.resume import KEEP, claim_checkpoints, drop_kept, keep_checkpoints, kept_folder
from flows.summary import stopped_markdown
from flows.workspace import RUNS_DIR, remove_abandoned
from ssd.data.layout import CHECKPOINT_DIR
from ssd.util.files import exclusive_lock, lock_file

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def git(*args: str, cwd) -> str:
    import os

    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                          env={**os.environ, **GIT_ENV}).stdout


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    git("init", "-q", cwd=root)
    (root / "params.yaml").write_text("train:\n  epochs: 5  # comment\n")
    git("add", "params.yaml", cwd=root)
    git("commit", "-q", "-m", "one", cwd=root)
    return root


def workspace(project, name: str, params: str | None = None, checkpoints: tuple[str, ...] = ()):
    """A run's worktree at HEAD (its params.yaml replaced by ``params``) holding ``checkpoints``."""
    path = project / RUNS_DIR / name
    git("worktree", "add", "-q", "--detach", str(path), "HEAD", cwd=project)
    if params is not None:
        (path / "params.yaml").write_text(params)
    for file in checkpoints:
        (path / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        (path / CHECKPOINT_DIR / file).write_text(f"{name}:{file}")
    return path


def held(path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def quiet(line: str) -> None:
    pass


def test_a_stopped_runs_checkpoints_go_once_to_a_run_with_the_same_commit_and_params(project):
    stopped = workspace(project, "stopped", checkpoints=("epoch_0001.pt", "epoch_0002.pt"))
    kept = keep_checkpoints(project, stopped, quiet)
    assert kept == kept_folder(project, stopped) and held(kept) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert (kept / "epoch_0002.pt").samefile(stopped / CHECKPOINT_DIR / "epoch_0002.pt")  # linked, not copied
    # Other params (one value; comments and layout alike count: the whole file is the key): nothing.
    assert claim_checkpoints(project, workspace(project, "other", "train:\n  epochs: 6  # comment\n"), quiet) == []
    # The same params: the kept checkpoints replace whatever the workspace had checked out.
    same = workspace(project, "same", checkpoints=("epoch_0009.pt",))
    assert claim_checkpoints(project, same, quiet) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert held(same / CHECKPOINT_DIR) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert (same / CHECKPOINT_DIR / "epoch_0002.pt").read_text() == "stopped:epoch_0002.pt"
    assert claim_checkpoints(project, workspace(project, "again"), quiet) == []  # taken by one run only
    # Another commit, the same params: nothing either.
    old_head = workspace(project, "old-head", checkpoints=("epoch_0001.pt",))
    (project / "README").write_text("two\n")
    git("add", "README", cwd=project)
    git("commit", "-q", "-m", "two", cwd=project)
    assert keep_checkpoints(project, old_head, quiet).exists()
    assert claim_checkpoints(project, workspace(project, "new-head"), quiet) == []


def test_keep_takes_whole_checkpoints_only_and_the_later_ones(project):
    training = workspace(project, "training", checkpoints=("epoch_0003.pt", ".tmp-epoch_0004.pt-x.pt"))
    with exclusive_lock(lock_file(training / CHECKPOINT_DIR)):  # a training still stopping there
        kept = keep_checkpoints(project, training, quiet)
    assert held(kept) == ["epoch_0003.pt"]  # not the one it was writing
    behind = workspace(project, "behind", checkpoints=("epoch_0002.pt",))
    assert keep_checkpoints(project, behind, quiet) == kept and held(kept) == ["epoch_0003.pt"]
    ahead = workspace(project, "ahead", checkpoints=("epoch_0004.pt",))
    assert keep_checkpoints(project, ahead, quiet) == kept and held(kept) == ["epoch_0004.pt"]
    assert keep_checkpoints(project, workspace(project, "none"), quiet) is None


def test_what_is_kept_is_bounded_and_dropped_when_a_run_completes(project):
    runs = [workspace(project, f"run-{i}", f"train:\n  epochs: {i}\n", ("epoch_0001.pt",)) for i in range(KEEP + 1)]
    kept = [keep_checkpoints(project, ws, quiet) for ws in runs]
    assert [path.exists() for path in kept] == [False] + [True] * KEEP  # the least recently kept went
    drop_kept(project, runs[-1])
    assert not kept[-1].exists() and kept[1].exists()


def test_a_killed_runs_workspace_is_removed_and_its_checkpoints_kept(project):
    killed = workspace(project, "killed", checkpoints=("epoch_0001.pt",))
    orphan = workspace(project, "orphan", "train:\n  epochs: 7\n", ("epoch_0001.pt",))
    for path in (killed, orphan):
        lock_file(path).touch()  # their runs died: nobody holds these
    with exclusive_lock(lock_file(orphan / CHECKPOINT_DIR)):  # ... but this one's training still runs
        assert remove_abandoned(project, quiet) == [killed]
    assert not killed.exists() and orphan.exists()
    assert held(kept_folder(project, workspace(project, "next"))) == ["epoch_0001.pt"]


def test_the_summary_of_a_stopped_run_says_how_and_where_its_checkpoints_are(project):
    kept = keep_checkpoints(project, workspace(project, "stopped", checkpoints=("epoch_0001.pt",)), quiet)
    markdown = stopped_markdown("cancelled", "train", {"fetch": "ran", "validate": "ran"}, kept, ["base.seed=1"])
    assert "**Run cancelled** in stage `train`" in markdown and f"`{kept}` (`epoch_0001.pt`)" in markdown
    assert "| validate | ran |" in markdown and "`base.seed=1`" in markdown
    assert "**No checkpoints kept**" in stopped_markdown("failed", "fetch", {}, None, [])
