"""The MLflow UI addresses of a training run, its model version and its gallery (ssd/mlops/links.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_pages import resolve
from ssd.mlops.links import GALLERY_ARTIFACT, LOCAL_UI, run_links, ui_links


def test_a_servers_links_are_its_own_pages():
    links = ui_links("http://mlflow.example:5000/", "7", "abc123", "tinyssd", 3)
    run = "http://mlflow.example:5000/#/experiments/7/runs/abc123"
    assert links.run == run and links.serve_command is None
    assert links.experiment == "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert links.model_version == "http://mlflow.example:5000/#/models/tinyssd/versions/3"
    assert links.gallery == f"{run}/artifactPath/evaluation/pictures/gallery.png"
    assert ui_links("https://m", "1", "r", gallery=False).gallery is None
    assert ui_links("https://m", "1", "r").model_version is None


def test_a_local_stores_links_are_those_of_mlflow_ui_with_its_command():
    links = ui_links("sqlite:////data/my project/mlflow.db", "1", "abc123", "tinyssd", 1)
    assert links.run == f"{LOCAL_UI}/#/experiments/1/runs/abc123" and links.run_id == "abc123"
    assert links.serve_command == "mlflow ui --backend-store-uri 'sqlite:////data/my project/mlflow.db'"


def test_the_routes_are_the_installed_mlflow_uis():
    """The UI's routes, as its bundle declares them: a new MLflow that moves a page fails here."""
    import mlflow

    (bundle,) = (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("main.*.js")
    code = bundle.read_bytes()
    for route in (b'"/experiments/:experimentId/runs/:runUuid"', b'"/experiments/:experimentId/runs/:runUuid/artifactPath/*"',
                  b'"/models/:modelName/versions/:version"'):
        assert route in code, route


@pytest.mark.slow
def test_the_links_open_the_run_version_and_gallery_on_a_real_server(mlflow_server, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.create_experiment("links-test")
    run = client.create_run(experiment).info.run_id
    picture = tmp_path / Path(GALLERY_ARTIFACT).name
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    client.log_artifact(run, str(picture), str(Path(GALLERY_ARTIFACT).parent))
    client.create_registered_model("links-test")
    version = client.create_model_version("links-test", f"runs:/{run}/model", run_id=run).version

    links = run_links(mlflow_server, run, "links-test", version)
    assert resolve(mlflow_server, links.run) == ("run", (experiment, run))
    assert resolve(mlflow_server, links.model_version) == ("model_version", ("links-test", version))
    assert resolve(mlflow_server, links.gallery) == ("artifact", (experiment, run, GALLERY_ARTIFACT))
    assert run_links(mlflow_server, client.create_run(experiment).info.run_id).gallery is None  # no picture logged
