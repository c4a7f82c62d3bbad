"""Shared test setup: keep torch to the machine's two cores and make every test hermetic."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    # Tests that need MLflow start their own server or store; never the user's.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
