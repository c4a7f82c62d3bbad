"""A full disk during training: one line saying so (exit 1), the previous results kept, no report
describing a model that was not written; with space again, the rerun resumes."""
from __future__ import annotations

import subprocess
import sys

from tiny_data import make_project, train_env


def test_training_on_a_full_disk_says_so_and_writes_no_report(tmp_path, small_disk, mlflow_server):
    project = make_project(tmp_path / "p")
    # models/ on the 1 MiB disk: the first checkpoint (several MB) cannot be written
    (project / "models").rmdir() if (project / "models").exists() else None
    (project / "models").symlink_to(small_disk, target_is_directory=True)
    run = subprocess.run([sys.executable, "-m", "ssd", "train"], cwd=project, capture_output=True, text=True,
                         timeout=300, env=train_env(mlflow_server))
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ssd train: error: [Errno 28] no space left on device writing ") and \
        "models/checkpoints/epoch_0001.pt" in last, last
    assert not (project / "reports/train.json").exists() and not (project / "reports/train_history.csv").exists()
    assert not any(small_disk.rglob(".tmp-*"))  # no half-written file left behind
