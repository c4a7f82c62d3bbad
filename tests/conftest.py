"""Shared test setup: keep torch to the machine's two cores and make every test hermetic."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# One rule for `slow`, so `pytest -m "not slow"` is the quick loop: a test is slow when it starts a
# server (these fixtures) or is marked by hand (several processes, a whole pipeline).
SERVER_FIXTURES = {"mlflow_server", "prefect_api", "archive_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    # Tests that need MLflow start their own server or store; never the user's.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend in a temp folder); yields its http URI."""
    import sys
    from pathlib import Path

    from servers import free_port, http_server

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with http_server(command, uri + "/health", root / "server.log"):
        yield uri


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted at a folder of ``tmp_path``: a real full disk for the disk-full cases.
    Mounting needs root (CI and these machines run as root); elsewhere the test is skipped, saying why."""
    import subprocess

    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
