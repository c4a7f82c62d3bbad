"""What an MLflow UI address in a run's summary opens, resolved on the real tracking server: the page
is served, and the run, model version or artifact its route names exists there."""
from __future__ import annotations

import re
import urllib.request
from urllib.parse import quote, unquote

from ssd.mlops.links import TRAINING_WORKFLOW

RUN = r"experiments/([^/]+)/runs/([^/]+)"
ROUTES = {"experiment": re.compile(r"experiments/([^/]+)/runs\?" + re.escape(TRAINING_WORKFLOW)),
          "run": re.compile(RUN), "artifact": re.compile(RUN + r"/artifactPath/(.+)"),
          "model_version": re.compile(r"models/([^/]+)/versions/([^/]+)")}


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def resolve(server: str, url: str) -> tuple[str, tuple]:
    """``(kind, what)`` for the UI address ``url`` of ``server``: ``("run", (experiment, run))``,
    ``("artifact", (experiment, run, path))`` or ``("model_version", (name, version))``; fails the
    test unless the page answers and the thing exists on the server; ``("experiment", (experiment,))``
    for the experiment's training runs."""
    import mlflow

    page, _, route = url.partition("/#/")
    assert page == server.rstrip("/"), url
    status, kind, body = get(page + "/")
    assert status == 200 and "text/html" in kind, (url, status, kind)
    client = mlflow.MlflowClient(server)
    for name, pattern in ROUTES.items():
        match = pattern.fullmatch(route)
        if not match:
            continue
        parts = tuple(unquote(p) for p in match.groups())
        if name == "experiment":
            assert client.get_experiment(parts[0]).experiment_id == parts[0], url
        elif name == "model_version":
            assert client.get_model_version(*parts).version == parts[1]
        else:
            assert client.get_run(parts[1]).info.experiment_id == parts[0], url
        if name == "artifact":  # the file the UI shows, from the same server
            status, _, body = get(f"{page}/get-artifact?path={quote(parts[2])}&run_uuid={quote(parts[1])}")
            assert status == 200 and body.startswith(b"\x89PNG"), url
        return name, parts
    raise AssertionError(f"{url}: not a route of the MLflow UI that the tests know")
