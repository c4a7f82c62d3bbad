"""Prediction: any image mode or size in, boxes in original pixels out; clear errors for bad input."""
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.pyfunc import PythonModelContext
from PIL import Image

from ssd.cli import main as cli_main
from ssd.core.model import TinySSD
from ssd.engine.inference import to_pixels
from ssd.engine.prediction import predict_files
from ssd.mlops.models import is_model_uri
from ssd.mlops.pyfunc import OUTPUT_COLUMNS, TinySSDModel, encode_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Awkward inputs: RGBA, grey, palette, a JPEG named .png, a PNG named .jpg, non-square sizes."""
    d = tmp_path_factory.mktemp("images")
    Image.new("RGBA", (100, 80), (200, 100, 50, 128)).save(d / "rgba.png")
    Image.new("L", (300, 200), 90).save(d / "grey.png")
    Image.new("RGB", (40, 90), (10, 200, 30)).convert("P").save(d / "palette.png")
    Image.new("RGB", (64, 64), (120, 120, 200)).save(d / "jpeg.png", format="JPEG")
    Image.new("RGB", (50, 70), (90, 30, 30)).save(d / "png.jpg", format="PNG")
    return d


def test_to_pixels_scales_by_the_original_size_and_applies_the_threshold():
    rows = torch.tensor([[0, 0.95, 0.1, 0.2, 0.5, 0.6], [0, 0.5, 0.0, 0.0, 1.0, 1.0]])
    dets = to_pixels(rows, (200, 100), ["banana"], threshold=0.9)
    assert dets == [{"class_id": 0, "label": "banana", "score": 0.95, "box": [20.0, 20.0, 100.0, 60.0]}]
    # Boxes reaching past the image are clipped to it.
    assert to_pixels(torch.tensor([[0, 0.9, -0.1, 0.5, 1.2, 1.5]]), (10, 20), ["banana"], 0.0)[0]["box"] == \
        [0.0, 10.0, 10.0, 20.0]


def test_is_model_uri():
    assert is_model_uri("models:/tinyssd@champion") and is_model_uri("runs:/abc/model")
    assert not is_model_uri("models/model.pt") and not is_model_uri("model.pt")


def test_predict_any_mode_and_size_with_annotated_output(model_file, images, tmp_path):
    paths = sorted(images.iterdir())
    results = predict_files(paths, model_file, threshold=0.0, out=tmp_path / "out", image_size=64)
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for path, result in zip(paths, results):
        with Image.open(path) as original:
            size = original.size
        assert (result["width"], result["height"]) == size
        assert result["detections"], "threshold 0 keeps every detection NMS keeps"
        for d in result["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]
            assert 0 <= d["score"] <= 1 and d["label"] == "banana"
        with Image.open(result["annotated"]) as annotated:
            assert annotated.format == "PNG" and annotated.size == size and annotated.mode == "RGB"


def test_predict_cli_prints_json(model_file, images, tmp_path, capsys):
    rc = cli_main(["predict", str(images / "grey.png"), str(images / "rgba.png"), "--model", str(model_file),
                   "--threshold", "0.99", "--params", str(ROOT / "params.yaml"), "-S", "data.image_size=64",
                   "--out", str(tmp_path / "o")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in out] == ["grey.png", "rgba.png"]
    assert all(d["score"] >= 0.99 for r in out for d in r["detections"])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["grey.png", "rgba.png"]


def test_predict_cli_refuses_a_text_file(model_file, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    rc = cli_main(["predict", str(text), "--model", str(model_file), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "notes.jpg: cannot be read as an image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "missing/model.pt"], "model file not found: missing/model.pt"),
    ([], "image not found"),
])
def test_predict_cli_missing_model_or_image(model_file, images, args, message, capsys):
    image = str(images / "rgba.png") if args else "no-such-image.png"
    rc = cli_main(["predict", image, *(args or ["--model", str(model_file)])])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_pyfunc_predict_on_base64_images(model_file):
    model = TinySSDModel()
    model.load_context(PythonModelContext(artifacts={"weights": str(model_file)},
                                          model_config={"image_size": 64, "threshold": 0.9, "nms_threshold": 0.5}))
    blobs = []
    for img in (Image.new("RGBA", (100, 80), (1, 2, 3, 4)), Image.new("L", (30, 200), 90)):
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        blobs.append(encode_image(buffer.getvalue()))
    table = model.predict(None, pd.DataFrame({"image": blobs}), params={"threshold": 0.0})
    assert list(table.columns) == OUTPUT_COLUMNS
    assert set(table["image"]) == {0, 1}
    assert (table.loc[table.image == 1, "xmax"] <= 30).all() and (table.loc[table.image == 1, "ymax"] <= 200).all()
    assert model.predict(None, pd.DataFrame({"image": blobs}), params={"threshold": 1.01}).empty
    with pytest.raises(ValueError, match="row 0: column 'image' is not valid base64"):
        model.predict(None, pd.DataFrame({"image": ["***"]}))
    with pytest.raises(ValueError, match="image #0: cannot be read as an image"):
        model.predict(None, pd.DataFrame({"image": [encode_image(b"plain text")]}))


def test_inference_feeds_the_net_channels_last_with_the_same_detections():
    """predict and evaluate give the net channels-last input (about 1.7x faster on CPU), and the
    detections match those of plain NCHW input up to float rounding."""
    from ssd.core.anchors import decode_outputs
    from ssd.engine.evaluation import run_model
    from ssd.engine.inference import detect_raw

    torch.manual_seed(0)
    net = TinySSD(1, image_size=64).eval()
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(
        (args[0].dtype, args[0].is_contiguous(memory_format=torch.channels_last))))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    fast = detect_raw(net, images)
    run_model(net, images, torch.tensor([[[0, 0.1, 0.1, 0.5, 0.5]]] * 2), 0.5)
    assert seen == [(torch.float32, True)] * 2
    with torch.no_grad():
        plain = decode_outputs(*net(images.float()))
    for a, b in zip(fast, plain):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_annotated_pictures_never_overwrite_each_other(model_file, tmp_path):
    # a.png and a.jpg share a stem; a-2.png (read first) holds the name the third input would have taken
    folder = tmp_path / "in"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("a.jpg", "green"), ("a-2.png", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / name)
    results = predict_files(sorted(folder.iterdir()), model_file, threshold=0.99, out=tmp_path / "out", image_size=64)
    pictures = [r["annotated"] for r in results]
    assert len(set(pictures)) == 3 and sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(Path(p).name for p in pictures)
