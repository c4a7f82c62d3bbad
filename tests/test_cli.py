"""The `ssd` command line: help and usage errors, in a real subprocess."""
import subprocess
import sys
from pathlib import Path

from ssd.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def ssd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssd", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


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
