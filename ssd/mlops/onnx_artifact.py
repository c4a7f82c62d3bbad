"""A registered version's ONNX file: exported from the version's own weights, checked, logged, tagged.

``ssd register`` calls :func:`log_onnx` once per version (a version with the tag ``ONNX_TAG`` has its
file), after the load check and before any alias moves, so a version that is ``champion`` or
``challenger`` always has one. The file is ``ssd export``'s graph of the version as the registry
holds it (``ssd.mlops.models``: weights and settings, no stored code; its own image size, NMS and
default threshold, its pixel limit in the metadata): ``ssd export --model models:/<name>/<N>``
writes the same. Before it is logged, onnxruntime's detections are compared with PyTorch's on
:data:`CHECK_IMAGES` images: the first of the version's validation split (sorted by name), then
generated ones (``ssd.engine.onnx_export.sample_images``) if the split has fewer. Every row that NMS
keeps counts (score threshold 0: more rows than any display threshold shows): the same count, and
each PyTorch row matched by one of its class with score and box fractions within
``ssd.engine.onnx_export.ATOL`` (``unmatched_rows``: rows whose scores tie come in either order).

Where it goes: ``onnx/<name>/<version>/model.onnx`` in the artifacts of the version's run (the run
it was registered from; a file per version, as one run may register two), and the version's tag
``ONNX_TAG`` says ``runs:/<run id>/onnx/<name>/<version>/model.onnx`` (``ssd.mlops.records``), which
``consumer/ssd_onnx`` resolves from ``models:/<name>@<alias>``.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ssd.mlops.records import ONNX_TAG, onnx_artifact, onnx_uri, version_uri
from ssd.mlops.registry import RUN_ID
from ssd.util.errors import TransientError, is_transient

if TYPE_CHECKING:  # torch is imported when a file is exported: `ssd register` reports a dead server first
    import torch

    from ssd.engine.inference import Detector

CHECK_IMAGES = 8   # images onnxruntime and PyTorch are compared on: the split's first, then generated ones


def check_images(split_dir: str | Path, image_size: int, max_pixels: int, count: int = CHECK_IMAGES) -> torch.Tensor:
    """``uint8 [count, 3, S, S]``: the first ``count`` images of the split (sorted by name, read as
    ``ssd predict`` reads them), then generated ones for what is missing."""
    import torch

    from ssd.data.images import read_image
    from ssd.engine.onnx_export import sample_images

    files = sorted((Path(split_dir) / "images").iterdir())[:count]
    tensors = [read_image(path, image_size, max_pixels)[0] for path in files]
    if len(tensors) < count:
        tensors += list(sample_images(count - len(tensors), image_size))
    return torch.stack(tensors)


def _detector(name: str, version: str) -> tuple[Detector, float, int]:
    """The version as the registry holds it, with its default threshold and pixel limit."""
    from ssd.data.images import DEFAULT_MAX_IMAGE_PIXELS
    from ssd.engine.inference import DEFAULT_THRESHOLD, PER_CLASS_NMS, Detector
    from ssd.mlops.models import open_model

    stored = open_model(version_uri(name, version), "cpu")
    settings = stored.settings
    detector = Detector(stored.net, settings["data.image_size"], settings["evaluate.nms_threshold"],
                        settings.get("evaluate.nms") == PER_CLASS_NMS, stored.source)
    return (detector, float(settings.get("evaluate.threshold", DEFAULT_THRESHOLD)),
            int(settings.get("data.max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)))


def _export_checked(detector: Detector, threshold: float, max_pixels: int, split_dir: str | Path,
                    path: Path, uri: str) -> None:
    """Write the ONNX file to ``path``; ``RuntimeError`` naming ``uri`` when it cannot be exported or
    does not give PyTorch's detections."""
    from ssd.engine.onnx_export import ATOL, compare, export_onnx

    try:
        with contextlib.redirect_stdout(sys.stderr):  # the exporter's lines: the stage's stdout is its record
            export_onnx(detector, path, threshold, max_pixels)
    except Exception as exc:  # any exporter failure: the version gets no ONNX, so no alias
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise RuntimeError(f"{uri} cannot be exported to ONNX ({reason}): no alias moved") from None
    images = check_images(split_dir, detector.image_size, max_pixels)
    problems = compare(path, detector, images, 0.0, ATOL)
    if problems:
        raise RuntimeError(f"{uri}: its ONNX graph does not give PyTorch's detections on {len(images)} validation "
                           f"images within {ATOL:g} ({'; '.join(problems)}): no alias moved")


def log_onnx(client: Any, name: str, version: Any, split_dir: str | Path) -> str:
    """Export registered ``version`` (an MLflow ``ModelVersion``) of ``name`` to ONNX, check it, log
    it into the version's run and tag the version; returns the tag's value (``runs:/...``).

    ``RuntimeError`` (exit 1) when the export fails or differs from PyTorch, ``TransientError``
    (exit 75) when the registry or artifact store could not be reached; the version is then not
    tagged and the next ``ssd register`` tries again.
    """
    number = str(version.version)
    uri = version_uri(name, number)
    run_id = version.run_id or (version.tags or {}).get(RUN_ID)
    if not run_id:
        raise RuntimeError(f"{uri} names no run to log its ONNX file into: no alias moved")
    detector, threshold, max_pixels = _detector(name, number)
    artifact = PurePosixPath(onnx_artifact(name, number))
    with tempfile.TemporaryDirectory(prefix="ssd-onnx-") as tmp:
        path = Path(tmp) / artifact.name
        _export_checked(detector, threshold, max_pixels, split_dir, path, uri)
        try:
            client.log_artifact(run_id, str(path), str(artifact.parent))
            client.set_model_version_tag(name, number, ONNX_TAG, onnx_uri(run_id, name, number))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            what = f"cannot log the ONNX file of {uri} into run {run_id} ({reason}): no alias moved"
            raise (TransientError if is_transient(exc) else RuntimeError)(what) from None
    return onnx_uri(run_id, name, number)
