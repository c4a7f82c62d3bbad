"""``models:/<name>@<alias>`` and ``models:/<name>/<version>`` as the version's ONNX file (extra ``[registry]``).

``ssd register`` logs each version's ONNX file into the version's run and tags the version with where
it is: tag :data:`ONNX_TAG` = ``runs:/<run id>/`` + :data:`ONNX_ARTIFACT` with the version's name and
number (copies of ``ssd.mlops.records``'s names; ``tests/pipeline/test_onnx_consumer.py`` checks they
agree). The alias is resolved once; the file is downloaded from that version's tag, so a promotion in
between cannot mix two versions. Only a tag naming that version's own path is followed, the file is at most
``ssd_onnx.model.MAX_MODEL_BYTES`` (its listed size checked before the download), and the file's own
metadata must name the same model and version. The server is ``MLFLOW_TRACKING_URI``.

Errors: :class:`Unreachable` (exit 75: try again later) when the server does not answer or answers
that it is failing; ``ValueError`` (exit 1) for the rest, one line each.
"""
from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

from ssd_onnx.model import MAX_MODEL_BYTES

ONNX_ARTIFACT = "onnx/{name}/{version}/model.onnx"
ONNX_TAG = "onnx"
MODEL_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?")
# MLflow's HTTP retries (its defaults keep a dead server silent for minutes), unless the environment sets them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_FAILING = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


class Unreachable(Exception):
    """The registry did not answer, or answered that it is failing: the same command may work later."""


def is_registry_uri(model: str) -> bool:
    return model.startswith("models:/")


def _failing(exc: BaseException) -> bool:
    """Whether an MLflow error means the server is unreachable or failing (not a refusal)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith("requests"):
            return True
        if getattr(exc, "error_code", None) in _FAILING:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _client() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ValueError("models:/ URIs need MLflow: pip install 'ssd-onnx[registry]' (or give an .onnx file)") from None
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("models:/ URIs need MLFLOW_TRACKING_URI (the tracking server), or give an .onnx file")
    if uri.startswith(("http://", "https://")):  # before MLflow's own retries: a dead server in seconds
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)})") from None
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def fetch(uri: str, dst: str | Path) -> tuple[Path, dict[str, Any]]:
    """Download the ONNX file of the version ``uri`` names into ``dst``; returns it and what the
    records' ``model`` block should say (``uri``, ``name``, ``version``, ``alias``)."""
    match = MODEL_URI.fullmatch(uri)
    if not match:
        raise ValueError(f"model URI {uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, number = match.groups()
    client = _client()
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        location = (version.tags or {}).get(ONNX_TAG)
        if not location:
            raise ValueError(f"{uri} (version {version.version}) has no ONNX file (no tag {ONNX_TAG!r}): it was "
                             f"registered before `ssd register` logged one; run `ssd export --model {uri}`")
        artifact = ONNX_ARTIFACT.format(name=name, version=version.version)
        run = re.fullmatch(r"runs:/([0-9A-Za-z]+)/" + re.escape(artifact), location)
        if not run:
            raise ValueError(f"{uri}: its tag {ONNX_TAG} = {location[:120]!r} is not runs:/<run id>/{artifact}: "
                             f"refused")
        listed = {f.path: f.file_size for f in client.list_artifacts(run.group(1), str(PurePosixPath(artifact).parent))}
        if artifact not in listed:
            raise ValueError(f"{uri}: its ONNX file {location} is missing from the artifact store")
        if (listed[artifact] or 0) > MAX_MODEL_BYTES:
            raise ValueError(f"{uri}: {location} is {listed[artifact]} bytes, more than {MAX_MODEL_BYTES}: refused")
        local = Path(client.download_artifacts(run.group(1), artifact, str(dst)))
    except ValueError:
        raise
    except Exception as exc:
        line = (str(getattr(exc, "message", exc)).strip().splitlines() or [type(exc).__name__])[0][:300]
        if _failing(exc):
            raise Unreachable(f"{uri}: {line}") from None
        raise ValueError(f"{uri}: {line}") from None
    return local, {"uri": uri, "name": name, "version": int(version.version), "alias": alias}


def check_names(block: dict[str, Any], source: dict[str, Any], uri: str) -> None:
    """The file's own ``model`` block must name the version its tag is on."""
    if (block.get("name"), block.get("version")) != (source["name"], source["version"]):
        raise ValueError(f"{uri}: its ONNX file says it is {block.get('name')!r} version {block.get('version')!r}, "
                         f"not version {source['version']}: refused")
