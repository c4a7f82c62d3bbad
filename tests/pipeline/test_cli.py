"""The `ssd` command line: help, usage errors and the exit-code contract (0, 1, 2, 75), each
produced by a real `ssd` process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import dead_port
from ssd.cli import COMMANDS, EXIT_STATUS_ENV
from tiny_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]


def ssd(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssd", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_help_lists_every_command():
    result = ssd("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: ssd" in result.stdout
    for name in COMMANDS:
        assert name in result.stdout


def test_unknown_command_exits_2():
    result = ssd("frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_no_command_exits_2():
    result = ssd()
    assert result.returncode == 2
    assert "required: COMMAND" in result.stderr or "the following arguments are required" in result.stderr


@pytest.fixture
def dataset(tmp_path):
    write_dataset(tmp_path / "raw", train=2, val=2, size=64)
    return tmp_path / "raw"


@pytest.mark.parametrize("case", ["ok", "failed-check", "usage"])
def test_exit_codes_and_status_file(case, dataset, tmp_path):
    """0, 1 (a failed check) and 2, also written where SSD_EXIT_STATUS_FILE says."""
    if case == "failed-check":  # a box with xmin > xmax
        label = dataset / "banana-detection/bananas_val/label.csv"
        rows = label.read_text().splitlines()
        name, cls, x1, y1, x2, y2 = rows[1].split(",")
        label.write_text("\n".join([rows[0], ",".join([name, cls, x2, y1, x1, y2]), *rows[2:]]) + "\n")
    args = ["validate", "--data", str(dataset), "--out", str(tmp_path / "reports"),
            "--params", str(ROOT / "params.yaml"), "-S", "data.image_size=64"]
    if case == "usage":
        args.append("--frobnicate")
    status = tmp_path / "status"
    result = ssd(*args, cwd=tmp_path, **{EXIT_STATUS_ENV: str(status)})
    expected = {"ok": 0, "failed-check": 1, "usage": 2}[case]
    assert result.returncode == expected, result.stderr[-2000:]
    assert status.read_text() == f"{expected}\n"
    if expected == 1:
        assert result.stderr.startswith("ssd validate: error: ") and "xmin" in result.stderr


def test_unreachable_download_server_exits_75(tmp_path):
    """A server that does not answer: 75 (transient, the flow retries), not 1."""
    url = f"http://127.0.0.1:{dead_port()}/bananas.zip"
    status = tmp_path / "status"
    fetch = ssd("fetch", "--source", url, "--out", str(tmp_path / "raw"), "--quiet", "--params",
                str(ROOT / "params.yaml"), cwd=tmp_path, **{EXIT_STATUS_ENV: str(status)})
    assert fetch.returncode == 75, fetch.stderr[-2000:]
    assert "transient error (retry later): cannot reach" in fetch.stderr and status.read_text() == "75\n"
    assert not (tmp_path / "raw").exists()


@pytest.mark.slow
def test_unreachable_tracking_server_exits_75_before_any_work(tmp_path):
    url = f"http://127.0.0.1:{dead_port()}"
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": url}))
    evaluate = ssd("evaluate", "--run-file", str(tmp_path / "mlflow_run.json"), "--params", str(ROOT / "params.yaml"),
                   "--model", str(tmp_path / "model.pt"), "--reports", str(tmp_path / "reports"), cwd=tmp_path)
    assert evaluate.returncode == 75 and "is unreachable" in evaluate.stderr, evaluate.stderr[-2000:]
    assert not (tmp_path / "reports").exists()  # failed before any scoring

    promote = ssd("promote", "--version", "1", "--params", str(ROOT / "params.yaml"), cwd=tmp_path,
                  MLFLOW_TRACKING_URI=url)
    assert promote.returncode == 75 and "is unreachable" in promote.stderr, promote.stderr[-2000:]
