"""What a person sees in the MLflow UI, rendered by headless Chromium: the experiment link opens on the
training runs (not MLflow 3's GenAI overview), and a run's page shows its curves' metrics and gallery.

Needs a Chromium binary (Debian: ``apt install chromium``); without one these tests are skipped,
saying so. The pages are the installed MLflow's own, served by a real ``mlflow server``.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ssd.mlops.links import GALLERY_ARTIFACT, run_links

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
               None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(BROWSER is None, reason="no Chromium here (apt install chromium) to render the UI")]
# What only MLflow 3's GenAI view shows: its overview's button and its side bar's entry.
GENAI_VIEW = ("Detect Issues", "Playground")


def rendered(url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran (Chromium's virtual time lets the app fetch and render)."""
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                           "--virtual-time-budget=20000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def training_run(mlflow_server, tmp_path_factory):
    """A training run as ``ssd train`` starts it (experiment, tags, per-epoch curves) and its gallery."""
    import mlflow

    from ssd.mlops.training_run import start_or_resume_run

    mlflow.set_tracking_uri(mlflow_server)
    run, _ = start_or_resume_run(mlflow_server, "ui-test", None, "train-abc1234-20261205T000000Z")
    for epoch in (1, 2, 3):
        mlflow.log_metrics({"class_err": 0.1 / epoch, "bbox_mae": 0.01 / epoch}, step=epoch)
    picture = tmp_path_factory.mktemp("gallery") / Path(GALLERY_ARTIFACT).name
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    mlflow.log_artifact(str(picture), str(Path(GALLERY_ARTIFACT).parent))
    mlflow.end_run()
    return run_links(mlflow_server, run.info.run_id)


def test_the_experiment_link_opens_on_the_training_runs(training_run, tmp_path):
    page = rendered(training_run.experiment, tmp_path)
    assert "train-abc1234-20261205T000000Z" in page
    assert not [text for text in GENAI_VIEW if text in page]


def test_a_runs_page_lists_its_curves_and_the_gallery_is_one_click_away(training_run, tmp_path):
    page = rendered(training_run.run, tmp_path)
    assert "class_err" in page and "bbox_mae" in page
    assert Path(GALLERY_ARTIFACT).name in rendered(training_run.gallery, tmp_path)
