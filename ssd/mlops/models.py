"""A TinySSD named by an MLflow model URI or a model file, loaded as weights and settings: no stored code runs.

Accepted: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>/<path>``, another
artifact URI of a logged model, or a model file. A registered model is the pyfunc that ``ssd register``
logs (``ssd.mlops.pyfunc``); from it only two files are downloaded: ``MLmodel`` (YAML, read as data: where
the weights are and the model config) and the weights (``torch.load(weights_only=True)``). Its Python
code (``pyfunc.py``) is neither downloaded nor imported: only ``mlflow models serve`` and
``mlflow.pyfunc.load_model`` run it, and only when a person asks for them.

An alias is resolved once, and both files come from the version it named then (``models:/<name>/<N>``),
so a promotion in between cannot mix two versions. :class:`StoredModel` keeps what the model says about
itself as params keys (``data.image_size``, ``data.classes``, ``evaluate.nms_threshold``, ...; see
:data:`CONFIG_KEYS`), for the stage to check its params against, and where it came from
(``ssd.engine.inference.ModelSource``) for the outputs to name it.

Errors, one line each: a model that is not a TinySSD pyfunc, weights that are not a TinySSD, a setting
out of range, a missing model or alias (``ValueError``/``RuntimeError``, exit 1); a server that cannot be
reached (``ssd.util.errors.TransientError``, exit 75).
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, NamedTuple

import torch

from ssd.core.model import ModelFile, TinySSD, read_model
from ssd.core.recipe import detection_settings
from ssd.engine.inference import (DEFAULT_IMAGE_SIZE, DEFAULT_NMS_THRESHOLD, PER_CLASS_NMS, Detector, ModelSource,
                                  best_device)
from ssd.mlops.records import version_uri
from ssd.mlops.tracking import client as mlflow_client
from ssd.mlops.tracking import is_missing, tracking_uri
from ssd.util.errors import TransientError, is_transient
from ssd.util.params import parse_yaml
from ssd.util.settings import SCHEMA

DEFAULT_MODEL_NAME = "tinyssd"  # params.yaml's registry.model_name, for `ssd predict` outside a checkout
MLMODEL = "MLmodel"
WEIGHTS_ARTIFACT = "weights"   # the pyfunc's artifact holding model.pt (ssd.mlops.registry.log_pyfunc)
MAX_MLMODEL_BYTES = 1 << 20     # an MLmodel file is a few KB
MAX_WEIGHTS_BYTES = 1 << 30     # a TinySSD is a few MB; a larger "model" is refused before download
# The pyfunc's model config (``ssd.mlops.registry.model_config``) as params keys; the first two are required.
CONFIG_KEYS = {"image_size": "data.image_size", "nms_threshold": "evaluate.nms_threshold",
               "nms": "evaluate.nms", "threshold": "evaluate.threshold",
               "max_image_pixels": "data.max_image_pixels"}
REQUIRED_CONFIG = ("image_size", "nms_threshold")
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/<path> or a model file"


class StoredModel(NamedTuple):
    net: TinySSD
    source: ModelSource
    settings: dict[str, Any]   # what the model says about itself, as params keys (CONFIG_KEYS, data.classes)


def is_model_uri(model: str | Path) -> bool:
    """``models:/...``, ``runs:/...``, ``file://...`` and the like, as opposed to a file path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(model)))


def open_model(model: str | Path, device: str | torch.device | None = None) -> StoredModel:
    """The TinySSD of a model URI or file on ``device`` (default: ``best_device``), its settings and source."""
    device = best_device(device)
    if not is_model_uri(model):
        file = read_model(model, map_location=device)
        return StoredModel(file.net, ModelSource(str(model), run_id=file.run_id), file_settings(file))
    return _open_stored(str(model), device)


def resolve(uri: str) -> ModelSource:
    """What a ``models:/`` URI names now (an alias resolved to its version), nothing downloaded; errors as
    :func:`open_model`'s (an unreachable server: ``TransientError`` in seconds)."""
    return _resolve(_client(), uri)[0]


def load_detector(model: str | Path, image_size: int | None = None, nms_threshold: float | None = None,
                  device: str | torch.device | None = None) -> Detector:
    """A :class:`~ssd.engine.inference.Detector` with the model's own settings; ``image_size`` and
    ``nms_threshold`` only fill in what the model does not say (a model file says no NMS threshold),
    and one that contradicts it is a ``ValueError``. ``ssd predict`` resolves params the same way
    (``ssd.stages.model_params``)."""
    stored = open_model(model, device)
    given = {"data.image_size": image_size, "evaluate.nms_threshold": nms_threshold}
    values = {}
    for key, value in given.items():
        own = stored.settings.get(key)
        if own is not None and value is not None and own != value:
            raise ValueError(f"{key}={value!r} contradicts {model}'s own {own!r}")
        values[key] = own if own is not None else value
    per_class = stored.settings.get("evaluate.nms") == PER_CLASS_NMS
    return Detector(stored.net, values["data.image_size"] or DEFAULT_IMAGE_SIZE,
                    values["evaluate.nms_threshold"] or DEFAULT_NMS_THRESHOLD, per_class, stored.source)


def file_settings(file: ModelFile) -> dict[str, Any]:
    """What a model file says about itself: its classes, the image size it was trained at if recorded,
    and what its recipe detects with (``ssd.core.recipe.detection_settings``: nothing for ``book``)."""
    out: dict[str, Any] = {"data.classes": list(file.net.config.classes), **detection_settings(file.recipe)}
    if file.image_size is not None:
        out["data.image_size"] = file.image_size
    return out


def _open_stored(uri: str, device: torch.device) -> StoredModel:
    client = _client()
    source, base = _resolve(client, uri)
    with tempfile.TemporaryDirectory(prefix="ssd-model-") as tmp, _quiet_downloads():
        try:
            spec = _download(base, MLMODEL, tmp, MAX_MLMODEL_BYTES, uri)
            weights_path, config = pyfunc_parts(spec.read_text(errors="replace"), uri)
            weights = _download(base, weights_path, tmp, MAX_WEIGHTS_BYTES, uri)
        except (ValueError, TransientError):
            raise
        except Exception as exc:  # MLflow's own errors, one line
            raise _registry_error(exc, f"cannot download {uri}") from None
        file = read_model(weights, map_location=device, name=f"{uri} (its {weights_path})")
    settings = {**file_settings(file), **config_settings(config, uri)}
    if file.image_size is not None and file.image_size != settings["data.image_size"]:
        raise ValueError(f"{uri}: its config says image_size {settings['data.image_size']} but its weights "
                         f"were trained at {file.image_size}")
    return StoredModel(file.net, source._replace(run_id=source.run_id or file.run_id), settings)


def _client() -> Any:
    uri = tracking_uri()
    # A registry in a local SQLite file that is not there: say so instead of creating an empty one here.
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ValueError(f"no MLflow registry at {uri} (no such file): set MLFLOW_TRACKING_URI to the "
                         f"tracking server, or give --model a model file")
    return mlflow_client(uri)  # an unreachable server: TransientError in seconds


def registered_parts(uri: str) -> tuple[str, str | None, str | None] | None:
    """``(name, alias, version)`` of ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the other
    one None); None for a model that is not registered; ``ValueError`` for another ``models:/`` form."""
    registered = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if registered:
        return registered.group(1), registered.group(2), registered.group(3)
    if uri.startswith("models:/"):
        raise ValueError(f"model URI {uri}: expected {URI_FORMS}")
    return None


def _resolve(client: Any, uri: str) -> tuple[ModelSource, str]:
    """What ``uri`` names and the artifact URI of that model's folder (a version, not an alias)."""
    registered = registered_parts(uri)
    if registered:
        name, alias, number = registered
        try:
            version = (client.get_model_version_by_alias(name, alias) if alias
                       else client.get_model_version(name, number))
        except Exception as exc:
            raise _registry_error(exc, f"no model {uri} at {tracking_uri()}") from None
        source = ModelSource(uri, name, int(version.version), alias, version.run_id or None)
        return source, version_uri(name, version.version)
    run = re.fullmatch(r"runs:/([0-9a-zA-Z]+)/.+", uri)
    return ModelSource(uri, run_id=run.group(1) if run else None), uri.rstrip("/")


def _registry_error(exc: BaseException, what: str) -> Exception:
    """An MLflow error as one line: transient (exit 75), or a refusal (exit 1)."""
    from mlflow.exceptions import MlflowException

    message = exc.message if isinstance(exc, MlflowException) else str(exc)
    line = (message.strip().splitlines() or [type(exc).__name__])[0][:300]
    if is_transient(exc):
        return TransientError(f"{what}: {line}")
    return (ValueError if is_missing(exc) else RuntimeError)(f"{what}: {line}")


def _download(base: str, path: str, dst: str, max_bytes: int, uri: str) -> Path:
    """``base/path`` into ``dst``; refused, naming it, when the store lists it larger than ``max_bytes``."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(base)
    parent = str(PurePosixPath(path).parent)
    listed = {str(PurePosixPath(f.path).name): f.file_size for f in repo.list_artifacts("" if parent == "." else parent)}
    size = listed.get(PurePosixPath(path).name, 0)
    if PurePosixPath(path).name not in listed:
        raise ValueError(f"{uri} is not a TinySSD model: it has no {path}")
    if size and size > max_bytes:
        raise ValueError(f"{uri}: {path} is {size} bytes, more than a TinySSD's {max_bytes}: refused")
    local = Path(repo.download_artifacts(path, dst))
    if local.stat().st_size > max_bytes:
        raise ValueError(f"{uri}: {path} is {local.stat().st_size} bytes, more than a TinySSD's {max_bytes}: refused")
    return local


def pyfunc_parts(mlmodel: str, uri: str) -> tuple[str, dict[str, Any]]:
    """From an ``MLmodel`` file's text: the weights' path inside the model folder and the model config.

    Refused in one line when it is not the pyfunc ``ssd register`` logs: no weights artifact, a path
    that leaves the model folder, no config.
    """
    spec = parse_yaml(mlmodel, f"{uri} {MLMODEL}", position=False)
    flavor = spec.get("flavors", {}).get("python_function") if isinstance(spec, dict) else None
    flavor = flavor if isinstance(flavor, dict) else {}
    artifacts = flavor.get("artifacts")
    weights = artifacts.get(WEIGHTS_ARTIFACT) if isinstance(artifacts, dict) else None
    path = weights.get("path") if isinstance(weights, dict) else None
    if not isinstance(path, str) or not path:
        raise ValueError(f"{uri} is not a TinySSD model: its {MLMODEL} names no {WEIGHTS_ARTIFACT!r} artifact")
    parts = PurePosixPath(path).parts
    if path.startswith("/") or "\\" in path or ".." in parts or ":" in path:
        raise ValueError(f"{uri}: its {MLMODEL} puts the weights at {path!r}, outside the model: refused")
    config = flavor.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{uri} is not a TinySSD model: its {MLMODEL} has no model config (image size, NMS)")
    return path, config


def config_settings(config: dict[str, Any], uri: str) -> dict[str, Any]:
    """A pyfunc model config as params keys (:data:`CONFIG_KEYS`), each checked as the params are."""
    missing = [key for key in REQUIRED_CONFIG if key not in config]
    if missing:
        raise ValueError(f"{uri} is not a TinySSD model: its model config lacks {', '.join(missing)}")
    out = {}
    for key, param in CONFIG_KEYS.items():
        if key in config:
            check = SCHEMA[param]
            if not check.ok(config[key]):
                raise ValueError(f"{uri}: its model config has {key}={config[key]!r}: expected {check.expected}")
            out[param] = config[key]
    return out


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow progress bars on stderr while downloading (unless the environment asks for them)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    had = key in os.environ
    os.environ.setdefault(key, "false")
    try:
        yield
    finally:
        if not had:
            os.environ.pop(key, None)
