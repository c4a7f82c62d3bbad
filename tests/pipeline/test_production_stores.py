"""The production stores of docs/production.md, for real: `mlflow server` on PostgreSQL with its
artifacts in an S3-compatible server, `prefect server` on PostgreSQL, a DVC remote on S3; all on
127.0.0.1, started by the fixtures in tests/conftest.py (slow: they start servers).

The journey is a team's: train, evaluate and register in a checkout through the tracking server, then
predict with the champion from a folder outside any checkout, with no S3 credentials on the clients."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from project_copy import copy_project, git_init, project_env, sh
from servers import MLFLOW_ARTIFACTS, MLFLOW_BUCKET
from tiny_data import make_project

# The variables that give a process S3 access: MLflow's clients must work without any of them.
S3_VARIABLES = ("AWS_", "MLFLOW_S3_")


def without_s3_access(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if not key.startswith(S3_VARIABLES)}


def query(url: str, sql: str) -> list[tuple]:
    """Rows of ``sql`` on the PostgreSQL database at ``url`` (libpq's ``postgresql://`` form)."""
    import psycopg2

    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        rows = cursor.fetchall()
    connection.close()
    return rows


@pytest.mark.parametrize("driver", [None, "psycopg", "psycopg2"])
def test_postgresql_url_forms_connect(postgres, driver):
    """`postgresql://` is SQLAlchemy 2.1's psycopg 3; `+psycopg2` needs psycopg2: [server] has both."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres.url("postgres", driver))
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("select 1")).scalar() == 1
    assert engine.dialect.driver == (driver or "psycopg")
    engine.dispose()


def test_train_evaluate_register_predict_through_mlflow_on_postgres_and_s3(
        mlflow_production_server, postgres, s3_store, tmp_path):
    import mlflow

    uri = mlflow_production_server
    repo = copy_project(tmp_path / "repo")
    make_project(repo, epochs=1)
    name = yaml.safe_load((repo / "params.yaml").read_text())["registry"]["model_name"]
    env = without_s3_access({**project_env(repo, tmp_path), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
    git_init(repo, env)
    sh("ssd", "train", cwd=repo, env=env)
    sh("ssd", "evaluate", "-S", "evaluate.gallery_images=1", cwd=repo, env=env)
    sh("ssd", "register", cwd=repo, env=env)

    record = json.loads((repo / "reports/registration.json").read_text())
    client = mlflow.MlflowClient(uri, uri)
    champion = client.get_model_version_by_alias(name, "champion")
    assert (int(champion.version), record["decision"]) == (record["version"], "promoted")
    # The registry is PostgreSQL's, not a file store beside the server.
    assert (name, "champion", record["version"]) in query(
        postgres.url("mlflow"), "select name, alias, version from registered_model_aliases")

    # Artifacts go through the server (mlflow-artifacts:) into the bucket: the run's figures and
    # evaluation, the registered model's files with the trained weights.
    run = client.get_run(champion.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    keys = s3_store.keys(MLFLOW_BUCKET, f"{MLFLOW_ARTIFACTS}/")
    experiment = f"{MLFLOW_ARTIFACTS}/{run.info.experiment_id}"
    run_files = {key.removeprefix(f"{experiment}/{run.info.run_id}/artifacts/") for key in keys}
    assert {"train_curve.png", "evaluation/eval.json", "evaluation/pictures/gallery.png",
            f"onnx/{name}/{record['version']}/model.onnx"} <= run_files, keys  # the version's ONNX file too
    (model,) = [key.removesuffix("/MLmodel") for key in keys
                if key.startswith(f"{experiment}/models/") and key.endswith("/MLmodel")]
    assert model.split("/")[3] in champion.source, (model, champion.source)  # .../models/<model id>/artifacts
    weights = s3_store.client().get_object(Bucket=MLFLOW_BUCKET, Key=f"{model}/artifacts/model.pt")["Body"].read()
    assert weights == (repo / "models/model.pt").read_bytes()

    # A consumer: another folder, the tracking URI and nothing else from the team.
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    shutil.copy(repo / "data/raw/banana-detection/bananas_val/images/0.png", consumer / "banana.png")
    consumer_env = without_s3_access({**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(repo),
                                      "OMP_NUM_THREADS": "1"})
    predicted = subprocess.run([str(Path(sys.executable).with_name("ssd")), "predict", "banana.png",
                                "--model", f"models:/{name}@champion", "--params", str(repo / "params.yaml"),
                                "--threshold", "0"],
                               cwd=consumer, env=consumer_env, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    (result,) = json.loads(predicted.stdout)
    assert result["detections"], result


FLOW = """
from prefect import flow


@flow(name="production-stores-check")
def check() -> int:
    return 42


print(check())
"""


def test_prefect_server_on_postgres_records_a_flow_run(prefect_production_server, postgres, tmp_path):
    api = prefect_production_server
    with urllib.request.urlopen(api + "/health", timeout=10) as response:
        assert json.loads(response.read()) is True

    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect_home")}
    run = subprocess.run([sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("42"), run.stdout[-2000:] + run.stderr[-3000:]

    body = json.dumps({"flows": {"name": {"any_": ["production-stores-check"]}}}).encode()
    request = urllib.request.Request(api + "/flow_runs/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert [r["state_type"] for r in json.loads(response.read())] == ["COMPLETED"]
    assert query(postgres.url("prefect"), "select f.name, r.state_type::text from flow_run r "
                                          "join flow f on f.id = r.flow_id") == [("production-stores-check", "COMPLETED")]


def test_dvc_remote_on_s3_pushes_and_a_clone_pulls(s3_store, tmp_path):
    """The DVC remote of docs/production.md: S3-compatible, `verify = true`, credentials from the
    environment; a second clone pulls what the first pushed."""
    s3_store.client().create_bucket(Bucket="dvc")
    env = {**project_env(tmp_path, tmp_path), **s3_store.env}
    first = tmp_path / "first"
    (first / "data").mkdir(parents=True)
    (first / "data/labels.csv").write_text("img,label\n0.png,0\n")
    sh("git", "init", "-q", "-b", "main", cwd=first, env=env)
    sh("dvc", "init", "-q", cwd=first, env=env)
    sh("dvc", "add", "-q", "data", cwd=first, env=env)
    sh("dvc", "remote", "add", "-d", "team", "s3://dvc/store", cwd=first, env=env)
    sh("dvc", "remote", "modify", "team", "endpointurl", s3_store.endpoint, cwd=first, env=env)
    sh("dvc", "remote", "modify", "team", "verify", "true", cwd=first, env=env)
    sh("git", "add", "-A", cwd=first, env=env)
    sh("git", "commit", "-q", "-m", "data", cwd=first, env=env)
    sh("dvc", "push", "-q", cwd=first, env=env)
    assert [key for key in s3_store.keys("dvc", "store/") if key.startswith("store/files/md5/")]

    sh("git", "clone", "-q", str(first), str(tmp_path / "second"), cwd=tmp_path, env=env)
    sh("dvc", "pull", "-q", cwd=tmp_path / "second", env=env)
    assert (tmp_path / "second/data/labels.csv").read_text() == "img,label\n0.png,0\n"
