"""TinySSD as an MLflow pyfunc model, callable from Python or over REST.

Input: a pandas DataFrame with one column ``image`` holding each image's encoded file bytes
(PNG, JPEG, ... any size or mode) as a base64 string (raw ``bytes`` work too from Python).
Over REST that is::

    POST /invocations  {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]},
                        "params": {"threshold": 0.5}}

Output: a DataFrame with one row per detection: ``image`` (the input row), ``class_id``,
``label``, ``score`` and ``xmin, ymin, xmax, ymax`` in pixels of the image as displayed (EXIF
orientation applied; every stage reads images with ``ssd.data.dataset.read_image``), and
``model_name``, ``model_version``: the registered version that answered (what ``@champion`` resolved
to when the model was loaded; empty strings for a model not loaded from the registry). Images
without a detection above the threshold have no row. Param ``threshold`` (default: the
evaluation threshold the model was registered with) is the minimum score.

The model runs on the first GPU when there is one, else on the CPU; a model logged with a
``device`` entry in its model config (``"auto"``, ``"cpu"``, ``"cuda:1"``) can be pointed elsewhere at
load time (``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})``, or
``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cpu"}'`` for ``mlflow models serve``).

The model is logged "from code": MLflow stores this file with the model and runs it at load time
(the ``set_model`` call at the bottom), so nothing is pickled. Loading it this way runs the code stored
in the registry: ``mlflow models serve`` and ``mlflow.pyfunc.load_model`` do, at a person's request;
``ssd predict`` never does (it reads the weights and the config only, ``ssd.mlops.models``). Run
outside its package, this file imports absolutely, and the environment that loads the model needs
the ``ssd`` package installed (``pip install -e .``), as ``mlflow models serve --env-manager local`` has.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Sequence

import mlflow.models
import mlflow.pyfunc
import pandas as pd

from ssd.mlops.models import MLMODEL, WEIGHTS_ARTIFACT

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ["image", "class_id", "label", "score", "xmin", "ymin", "xmax", "ymax", "model_name", "model_version"]
# Written by MLflow into a model it downloads from the registry: the name and version it resolved.
REGISTERED_META = "registered_model_meta"


def encode_image(data: bytes) -> str:
    """Encoded image file bytes as the base64 text the model takes."""
    return base64.b64encode(data).decode("ascii")


def _decode(value: Any, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: column {IMAGE_COLUMN!r} is not valid base64") from None
    raise ValueError(f"row {row}: column {IMAGE_COLUMN!r} must hold base64 text or bytes, got {type(value).__name__}")


def decode_images(values: Sequence[Any], image_size: int, max_pixels: int) -> tuple[Any, list[tuple[int, int]]]:
    """The column ``image`` (base64 text or bytes per row) as ``uint8 Tensor[N, 3, S, S]`` and displayed
    sizes (``ssd.engine.prediction.read_images``); ``ValueError`` naming the first bad row (bad base64, not
    an image, over ``max_pixels``: ``ssd.data.images.ImageTooLarge``)."""
    from ssd.engine.prediction import read_images

    return read_images([_decode(v, i) for i, v in enumerate(values)], image_size, max_pixels)


def detections_frame(results: list[list[dict[str, Any]]], name: str = "", version: str = "") -> pd.DataFrame:
    """Per-image detection dicts (``ssd.engine.inference.detect``) as the flat output table, each row
    naming the model version ``name``/``version``."""
    rows = [{"image": i, "class_id": d["class_id"], "label": d["label"], "score": d["score"],
             "xmin": d["box"][0], "ymin": d["box"][1], "xmax": d["box"][2], "ymax": d["box"][3],
             "model_name": name, "model_version": version}
            for i, dets in enumerate(results) for d in dets]
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS).astype(
        {"image": "int64", "class_id": "int64", "label": "str", "score": "float64", "xmin": "float64",
         "ymin": "float64", "xmax": "float64", "ymax": "float64", "model_name": "str", "model_version": "str"})


def registered_version(weights: str | Path) -> tuple[str, str]:
    """The registered name and version a model folder was downloaded as (MLflow's ``registered_model_meta``
    beside ``MLmodel``, above ``weights``), or two empty strings."""
    from ssd.util.params import parse_yaml

    for folder in list(Path(weights).parents)[:3]:
        if (folder / MLMODEL).is_file():
            meta = folder / REGISTERED_META
            if not meta.is_file() or meta.stat().st_size > 4096:
                break
            info = parse_yaml(meta.read_text(errors="replace"), str(meta))
            if isinstance(info, dict):
                return str(info.get("model_name") or ""), str(info.get("model_version") or "")
            break
    return "", ""


class TinySSDModel(mlflow.pyfunc.PythonModel):
    """Loads ``model.pt`` from the model's artifacts; settings come from the model config."""

    def load_context(self, context):  # noqa: ANN001
        from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS
        from ssd.core.model import load_model
        from ssd.engine.inference import PER_CLASS_NMS, best_device

        config = context.model_config  # ssd.mlops.registry.model_config, from the checked params
        # "auto" (the registry's) picks the GPU when there is one; a load-time config may name a device.
        self.net = load_model(context.artifacts[WEIGHTS_ARTIFACT], map_location=best_device(config.get("device")))
        self.image_size = int(config["image_size"])
        # Versions registered before the limit was a param carry none: they get the default.
        self.max_pixels = int(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        self.nms_threshold = float(config["nms_threshold"])
        self.per_class = config.get("nms") == PER_CLASS_NMS  # versions registered before it was logged: agnostic
        self.threshold = float(config["threshold"])
        # Fixed at load: `mlflow models serve -m models:/tinyssd@champion` keeps this version until restarted.
        self.name, self.version = registered_version(context.artifacts[WEIGHTS_ARTIFACT])

    # The DataFrame type hint is one MLflow knows it cannot infer a schema from: it checks nothing
    # itself and leaves that to the explicit signature below. Without any hint it warns at every
    # class definition (every load), and that warning cannot be filtered from outside.
    def predict(self, context, model_input: pd.DataFrame,  # noqa: ANN001
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from ssd.engine.inference import detect

        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"expected a DataFrame with a column {IMAGE_COLUMN!r} of base64-encoded images")
        threshold = float((params or {}).get("threshold", self.threshold))
        images, sizes = decode_images(list(model_input[IMAGE_COLUMN]), self.image_size, self.max_pixels)
        found = detect(self.net, images, sizes, threshold, self.nms_threshold, per_class=self.per_class)
        return detections_frame(found, self.name, self.version)


def signature(threshold: float) -> Any:
    """Input: one string column ``image``; output: the detection table; param ``threshold``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = ([ColSpec("long", "image"), ColSpec("long", "class_id"), ColSpec("string", "label"),
                ColSpec("double", "score")] + [ColSpec("double", c) for c in OUTPUT_COLUMNS[4:8]]
               + [ColSpec("string", c) for c in OUTPUT_COLUMNS[8:]])
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), outputs=Schema(outputs),
                          params=ParamSchema([ParamSpec("threshold", "double", float(threshold))]))


def example_png() -> bytes:
    """A generated 64x64 PNG: the input example, and what ``ssd serve`` checks a model on before serving it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 160, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def example_input() -> pd.DataFrame:
    """A small input example (one generated 64x64 PNG), stored with the model and its signature."""
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(example_png())]})


mlflow.models.set_model(TinySSDModel())
