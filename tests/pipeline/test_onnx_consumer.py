"""The consumer without torch (consumer/, package ``ssd_onnx``) and the ONNX file ``ssd register`` logs.

``ssd_onnx`` cannot import ``ssd``: the few names and lines it shares with it are copies, and these
tests check each copy against its original (names equal, the same pixels from the same files, the
same detections). Detections agree within ``ssd.engine.onnx_export.ATOL`` on scores and on boxes as
fractions of the image (so ATOL x the image side in pixels), plus the JSON's rounding (scores to 6
decimals, boxes to 2)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.core.model import TinySSD, save_model
from ssd.engine.inference import Detector, describe, load_detector
from ssd.engine.onnx_export import ATOL, compare, export_onnx, sample_images
from tiny_data import write_dataset

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = ROOT / "consumer"


def noise_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """Noise with a bright rectangle: scores differ from anchor to anchor (no ties for NMS to order)."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    pixels[h // 4:h // 2, w // 3:w // 2 + 5] = 220
    return Image.fromarray(pixels).convert(mode)


def odd_images(folder: Path) -> Path:
    """One image of each kind the reader treats specially, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: 48 wide, 96 high
    noise_image((96, 48), 1).save(folder / "rotated.jpg", format="JPEG", quality=95, exif=exif)
    noise_image((80, 60), 2, "P").save(folder / "palette.gif")
    noise_image((70, 50), 3, "RGBA").save(folder / "alpha.png")
    noise_image((64, 64), 4, "L").save(folder / "grey.jpg", quality=90)
    wide = (np.asarray(noise_image((90, 40), 5, "L"), dtype=np.uint16) * 250)
    Image.fromarray(wide).save(folder / "deep.png")  # I;16
    Image.fromarray(np.asarray(noise_image((50, 50), 6, "L"), dtype=np.float32) / 255).save(folder / "float.tif")
    noise_image((120, 60), 7).save(folder / "plain.png")
    return folder


def trained_file(path: Path, size: int = 64, classes=("banana",), seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model(TinySSD(len(classes), classes=list(classes), image_size=size), path,
               params={"data": {"image_size": size, "classes": list(classes)}}, mlflow_run_id="0123456789abcdef")
    return path


def assert_same_detections(ours: list[dict], theirs: list[dict]) -> None:
    """Same images and sizes; per image the same detections, matched row to row within the tolerance."""
    assert [(r["image"], r["width"], r["height"]) for r in ours] == [(r["image"], r["width"], r["height"])
                                                                    for r in theirs]
    for a, b in zip(ours, theirs):
        assert len(a["detections"]) == len(b["detections"]), a["image"]
        box_tol = ATOL * max(a["width"], a["height"]) + 0.011
        left = list(b["detections"])
        for det in a["detections"]:
            match = next((other for other in left if other["class_id"] == det["class_id"]
                          and abs(other["score"] - det["score"]) <= ATOL + 1e-6
                          and max(abs(x - y) for x, y in zip(other["box"], det["box"])) <= box_tol), None)
            assert match is not None, f"{a['image']}: {det} has no match in {left[:3]}..."
            left.remove(match)


def imported_modules(stderr: str) -> set[str]:
    """The modules a ``python -X importtime`` run imported."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def consumer_run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -X importtime -m ssd_onnx ARGS`` with only consumer/ on the path."""
    environ = {**os.environ, "PYTHONPATH": str(CONSUMER), **env}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "ssd_onnx", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=environ)


def without_torch_or_ssd(stderr: str) -> set[str]:
    return {m for m in imported_modules(stderr) if re.match(r"(torch|ssd)(\.|$)", m)}


# ----------------------------------------------------------------------------------------------
# The copies agree with their originals

def test_the_copied_names_are_ssds():
    from ssd.data import images
    from ssd.engine import onnx_export
    from ssd.mlops import models, records, tracking
    from ssd.util import errors
    from ssd_onnx import images as onnx_images
    from ssd_onnx import model as onnx_model
    from ssd_onnx import registry as onnx_registry

    assert onnx_images.DEFAULT_MAX_IMAGE_PIXELS == images.DEFAULT_MAX_IMAGE_PIXELS
    assert onnx_images.IMAGE_EXTENSIONS == images.IMAGE_EXTENSIONS
    assert (onnx_model.INPUT, onnx_model.OUTPUTS) == (onnx_export.INPUT, onnx_export.OUTPUTS)
    assert (onnx_model.META_PREFIX, onnx_model.META_KEYS) == (onnx_export.META_PREFIX, onnx_export.META_KEYS)
    assert onnx_model.MAX_MODEL_BYTES == models.MAX_WEIGHTS_BYTES
    assert (onnx_registry.ONNX_ARTIFACT, onnx_registry.ONNX_TAG) == (records.ONNX_ARTIFACT, records.ONNX_TAG)
    assert onnx_registry.HTTP_DEFAULTS == tracking.HTTP_DEFAULTS
    assert onnx_registry._FAILING == errors._TRANSIENT_CODES
    written = onnx_export.metadata(Detector(TinySSD(1), 64, 0.5), 0.9, 10)
    assert list(written) == [onnx_model.META_PREFIX + key for key in onnx_model.META_KEYS]


def test_images_are_read_with_ssds_pixels(tmp_path):
    from ssd.data.images import read_image, read_rgb, to_tensor
    from ssd.engine.prediction import expand_images
    from ssd_onnx import images as onnx_images

    folder = odd_images(tmp_path / "images")
    files, _ = expand_images([folder])
    assert onnx_images.expand_images([folder]) == (files, [])
    assert len(files) == 7
    for path in files:
        ours = onnx_images.read_rgb(path)
        theirs = read_rgb(path)
        assert ours.size == theirs.size and ours.tobytes() == theirs.tobytes(), path.name
        for size in (64, 96):
            pixels = onnx_images.to_array(ours, size)
            assert pixels.dtype == np.uint8 and np.array_equal(pixels, to_tensor(theirs, size).numpy()), path.name
            tensor, displayed = read_image(path, size)  # the training's reader: the same pixels
            assert displayed == ours.size and np.array_equal(pixels, tensor.numpy()), path.name
    assert onnx_images.read_rgb(folder / "rotated.jpg").size == (48, 96)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert onnx_images.expand_images([empty]) == expand_images([empty])


def test_an_image_over_the_pixel_limit_is_refused_by_both(tmp_path):
    from ssd.data.images import ImageTooLarge, read_rgb
    from ssd_onnx import images as onnx_images

    noise_image((100, 100), 0).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLarge):
        read_rgb(tmp_path / "big.png", 9_999)
    with pytest.raises(onnx_images.ImageTooLarge, match=r"big.png: image too large \(100x100 pixels; the model's "
                                                         r"limit is max_image_pixels = 9999\)"):
        onnx_images.read_rgb(tmp_path / "big.png", 9_999)


def test_pixel_boxes_are_ssds():
    from ssd.engine.inference import to_pixels
    from ssd_onnx.model import to_pixels as onnx_to_pixels

    generator = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randint(0, 3, (40, 1), generator=generator).float(), torch.rand(40, 1, generator=generator),
                      torch.rand(40, 4, generator=generator) * 1.4 - 0.2], dim=1)  # boxes past the edges: clipped
    for size, threshold in (((640, 480), 0.5), ((33, 77), 0.0)):
        assert onnx_to_pixels(rows.numpy(), size, ["a", "b", "c"], threshold) == to_pixels(rows, size, ["a", "b", "c"],
                                                                                           threshold)


# ----------------------------------------------------------------------------------------------
# Predictions: ssd_onnx on the ONNX file gives ssd predict's

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-class model file (per-class NMS) and its ONNX export, as ``ssd export`` writes it."""
    folder = tmp_path_factory.mktemp("exported")
    weights = trained_file(folder / "model.pt", classes=("banana", "apple", "pear"))
    detector = load_detector(weights, device="cpu", per_class=True)
    export_onnx(detector, folder / "model.onnx", 0.9, 500_000)
    return detector, folder / "model.onnx"


def test_ssd_onnx_gives_ssd_predicts_detections(exported, tmp_path):
    from ssd.engine.prediction import predict_files
    from ssd_onnx.model import load
    from ssd_onnx.model import predict_files as onnx_predict_files

    detector, path = exported
    folder = odd_images(tmp_path / "images")
    model = load(path)
    assert (model.image_size, model.classes, model.threshold, model.max_pixels) == (
        64, ["banana", "apple", "pear"], 0.9, 500_000)
    theirs = predict_files([folder], detector, 0.0, batch_size=3)
    ours = onnx_predict_files(model, [folder], 0.0, batch_size=4)
    assert sum(len(r["detections"]) for r in ours) > 20
    assert_same_detections(ours, theirs)
    assert ours[0]["model"] == {**describe(detector), "uri": str(path)}


def test_the_command_imports_neither_torch_nor_ssd(exported, tmp_path):
    from ssd_onnx.model import load
    from ssd_onnx.model import predict_files as onnx_predict_files

    _, path = exported
    folder = odd_images(tmp_path / "images")
    result = consumer_run("predict", str(path), str(folder / "plain.png"), str(folder / "rotated.jpg"), "--json",
                          "out.json", "--threshold", "0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnxruntime" in imported_modules(result.stderr)  # the check below could fail
    assert not without_torch_or_ssd(result.stderr) and "mlflow" not in imported_modules(result.stderr)
    written = json.loads((tmp_path / "out.json").read_text())
    assert result.stdout == "" and written == onnx_predict_files(
        load(path), [folder / "plain.png", folder / "rotated.jpg"], 0.5)


def test_refusals_are_one_line(exported, tmp_path):
    import onnx

    _, path = exported
    noise_image((40, 30), 0).save(tmp_path / "img.png")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (["junk.onnx", "img.png"], 1, "junk.onnx: not an ONNX model onnxruntime can run"),
        (["bare.onnx", "img.png"], 1, "bare.onnx: not a TinySSD ONNX file (its metadata has no ssd.image_size)"),
        (["missing.onnx", "img.png"], 1, "missing.onnx: model file not found"),
        ([str(path), "img.png", "--threshold", "1.5"], 1, "--threshold 1.5: expected a number in [0, 1]"),
        (["models:/tinyssd@champion", "img.png"], 1, "models:/ URIs need MLFLOW_TRACKING_URI"),
        (["models:/tinyssd", "img.png"], 1, "model URI models:/tinyssd: expected models:/<name>@<alias>"),
    ]
    for args, code, message in cases:
        result = consumer_run("predict", *args, cwd=tmp_path)
        (line,) = [ln for ln in result.stderr.splitlines() if not ln.startswith("import time:")]
        assert result.returncode == code and result.stdout == "", (args, result.stderr[-500:])
        assert line.startswith("ssd-onnx predict: error: ") and message in line, line
    # An unreadable image is skipped, the others predicted: exit 1 at the end.
    result = consumer_run("predict", str(path), "notes.txt", "img.png", cwd=tmp_path)
    assert result.returncode == 1 and [r["image"] for r in json.loads(result.stdout)] == ["img.png"]
    assert "ssd-onnx predict: skipped notes.txt: cannot be read as an image" in result.stderr


def test_the_check_fails_when_the_onnx_graph_is_not_the_model(exported):
    """``compare``, which ``ssd register`` and ``ssd export`` pass before keeping a file, can fail."""
    detector, path = exported
    images = sample_images(4, 64)
    assert compare(path, detector, images, 0.0, ATOL) == []
    torch.manual_seed(1)
    other = Detector(TinySSD(3, classes=["banana", "apple", "pear"], image_size=64).eval(), 64, 0.5, True)
    assert compare(path, other, images, 0.0, ATOL)


def test_the_benchmark_measures_both(tmp_path):
    from benchmarks import onnx_predict

    report = onnx_predict.run({**onnx_predict.SMOKE, "images": 2}, commands=False)
    assert report["images"] == 2 and report["torch_images_per_sec"] > 0 and report["onnx_images_per_sec"] > 0
    assert report["onnx_speedup"] == pytest.approx(report["onnx_images_per_sec"] / report["torch_images_per_sec"])


# ----------------------------------------------------------------------------------------------
# Through the registry: the ONNX file `ssd register` logs, fetched by models:/NAME@champion

def _training_run(folder: Path, uri: str) -> dict:
    """What training and evaluation leave: a model file, its MLflow run, eval.json and the data."""
    import mlflow
    from ssd.mlops.tracking import write_run_file

    folder.mkdir(parents=True)
    trained_file(folder / "model.pt", seed=3)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        pass
    write_run_file(run.info.run_id, uri, folder / "mlflow_run.json")
    (folder / "eval.json").write_text(json.dumps({"map_50": 0.4}))
    return {"model_path": folder / "model.pt", "eval_file": folder / "eval.json",
            "run_file": folder / "mlflow_run.json", "out": folder / "registration.json",
            "data_dir": write_dataset(folder / "raw", train=1, val=3, size=64)}


def test_register_logs_the_onnx_that_ssd_onnx_predicts_as_ssd_predict(mlflow_server, tmp_path):
    import mlflow
    from ssd.mlops.records import ONNX_TAG, onnx_artifact, onnx_uri
    from ssd.stages.register import register
    from ssd.util.params import load_settings

    name = "tinyssd-onnx"
    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", f"registry.model_name={name}"])
    run = _training_run(tmp_path / "run", mlflow_server)
    record = register(settings, **run)
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    version = client.get_model_version(name, str(record["version"]))
    run_id = json.loads(run["run_file"].read_text())["run_id"]
    assert version.tags[ONNX_TAG] == record["onnx"] == onnx_uri(run_id, name, 1) and "champion" in record["aliases"]
    assert [f.path for f in client.list_artifacts(run_id, f"onnx/{name}/1")] == [onnx_artifact(name, 1)]

    consumer = odd_images(tmp_path / "consumer")  # outside any checkout, no params file
    images = ["plain.png", "rotated.jpg", "deep.png"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    uri = f"models:/{name}@champion"
    torch_run = subprocess.run([sys.executable, "-m", "ssd", "predict", *images, "--model", uri, "--threshold", "0"],
                               cwd=consumer, capture_output=True, text=True, timeout=300,
                               env={**env, "PYTHONPATH": str(ROOT)})
    assert torch_run.returncode == 0, torch_run.stderr[-2000:]
    onnx_run = consumer_run("predict", uri, *images, "--threshold", "0", cwd=consumer, MLFLOW_TRACKING_URI=mlflow_server)
    assert onnx_run.returncode == 0, onnx_run.stderr[-2000:]
    assert not without_torch_or_ssd(onnx_run.stderr) and "mlflow" in imported_modules(onnx_run.stderr)
    theirs, ours = json.loads(torch_run.stdout), json.loads(onnx_run.stdout)
    assert sum(len(r["detections"]) for r in ours) > 10
    assert_same_detections(ours, theirs)
    assert ours[0]["model"] == theirs[0]["model"]  # uri, name, version, alias, run, classes, settings
    assert (ours[0]["model"]["version"], ours[0]["model"]["alias"]) == (record["version"], "champion")

    # The file itself, fetched as any MLflow client would, names the version.
    local = mlflow.artifacts.download_artifacts(record["onnx"], dst_path=str(tmp_path / "fetched"))
    from_file = consumer_run("predict", local, *images, "--threshold", "0", cwd=consumer)
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    by_file = json.loads(from_file.stdout)
    assert_same_detections(by_file, theirs)
    assert by_file[0]["model"] == {**theirs[0]["model"], "uri": local, "alias": None}

    # Again with the same weights: the version is reused and keeps its file (not exported again).
    again = register(settings, **run)
    assert (again["version"], again["reused_version"], again["onnx"]) == (record["version"], True, record["onnx"])
    # Other weights from the same run (raising train.epochs continues it): a second file beside the first.
    trained_file(run["model_path"], seed=4)
    second = register(settings, **run)
    assert (second["version"], second["onnx"]) == (2, onnx_uri(run_id, name, 2))
    first = consumer_run("predict", f"models:/{name}/1", *images, "--threshold", "0", cwd=consumer,
                         MLFLOW_TRACKING_URI=mlflow_server)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)[0]["model"]["version"] == 1
    # A tag that points at another version's file is not followed.
    client.set_model_version_tag(name, "2", ONNX_TAG, onnx_uri(run_id, name, 1))
    moved = consumer_run("predict", f"models:/{name}/2", *images, cwd=consumer, MLFLOW_TRACKING_URI=mlflow_server)
    assert moved.returncode == 1 and moved.stdout == ""
    assert f"its tag onnx = '{onnx_uri(run_id, name, 1)}' is not runs:/<run id>/{onnx_artifact(name, 2)}: " \
           f"refused" in moved.stderr


@pytest.mark.slow
def test_consumer_installs_and_predicts_without_torch(exported, tmp_path):
    """consumer/ in a fresh venv (pip from the package index): no torch there, the same records as
    ``ssd_onnx`` here, and its size (site-packages, printed) stays far under torch's."""
    from ssd_onnx.model import load
    from ssd_onnx.model import predict_files as onnx_predict_files

    _, path = exported
    source = shutil.copytree(CONSUMER, tmp_path / "consumer", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                                str(source)], capture_output=True, text=True, timeout=900)  # builds in the copy
    assert installed.returncode == 0, installed.stderr[-2000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    size_mb = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
    print(f"consumer/ installed: {size_mb:.0f} MiB in site-packages")
    assert size_mb < 400

    folder = odd_images(tmp_path / "images")
    result = subprocess.run([str(venv / "bin" / "ssd-onnx"), "predict", str(path), str(folder), "--threshold", "0.3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == onnx_predict_files(load(path), [folder], 0.3)
