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
