"""The one image reader (ssd.data.images.read_image) in every stage: EXIF orientation for pixels, boxes and
predictions; 16-bit and other modes; the pixel limit; animations; predict over folders; label.csv errors.

Every awkward input is made here, by the test itself.
"""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.cli import main as cli_main
from ssd.data.dataset import load_dataset
from ssd.data.images import ImageTooLarge, read_image, read_rgb
from ssd.data.labels import read_labels
from ssd.engine.prediction import predict_files
from ssd.data.checks import run_validation
from tiny_data import write_split

ROOT = Path(__file__).resolve().parents[2]
HEADER = "img_name,label,xmin,ymin,xmax,ymax\n"

# The displayed (upright) picture: 60 wide, 100 tall, dark, with a bright box at x 10..30, y 60..90.
DISPLAYED_SIZE = (60, 100)
BOX = (10, 60, 30, 90)


def displayed_picture() -> Image.Image:
    pixels = np.full((DISPLAYED_SIZE[1], DISPLAYED_SIZE[0], 3), 20, dtype=np.uint8)
    x1, y1, x2, y2 = BOX
    pixels[y1:y2, x1:x2] = 235
    return Image.fromarray(pixels)


def exif_jpeg(path: Path, orientation: int) -> Path:
    """A JPEG stored sideways with the EXIF orientation that shows it as :func:`displayed_picture`.

    Orientation 6: the viewer turns the stored image 90 degrees clockwise; 8: counter-clockwise.
    """
    stored = displayed_picture().transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif)
    return path


# ---------------------------------------------------------------------------------------------
# EXIF orientation: pixels, label boxes, validation and predictions all in the displayed frame

@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_gives_the_displayed_pixels(orientation, tmp_path):
    path = exif_jpeg(tmp_path / "photo.jpg", orientation)
    with Image.open(path) as stored:
        assert stored.size == DISPLAYED_SIZE[::-1]  # stored sideways
    img = read_rgb(path)
    assert img.size == DISPLAYED_SIZE and img.mode == "RGB"
    a = np.asarray(img).astype(int)
    x1, y1, x2, y2 = BOX
    assert a[y1 + 3:y2 - 3, x1 + 3:x2 - 3].min() > 200      # the box is where the viewer shows it
    assert a[5:y1 - 5].max() < 60 and a[:, x2 + 5:].max() < 60  # and nothing bright elsewhere
    tensor, size = read_image(path, 50)
    assert size == DISPLAYED_SIZE and tensor.shape == (3, 50, 50) and tensor.dtype == torch.uint8


@pytest.mark.parametrize("orientation", [6, 8])
def test_label_boxes_are_normalised_in_the_displayed_frame(orientation, tmp_path):
    split = tmp_path / "train"
    (split / "images").mkdir(parents=True)
    exif_jpeg(split / "images" / "photo.jpg", orientation)
    (split / "label.csv").write_text(HEADER + "photo.jpg,0,{},{},{},{}\n".format(*BOX))
    ds = load_dataset(split, "train", 50)
    w, h = DISPLAYED_SIZE
    expected = torch.tensor([0, BOX[0] / w, BOX[1] / h, BOX[2] / w, BOX[3] / h])
    torch.testing.assert_close(ds.labels[0, 0], expected)
    # The box's pixels in the resized tensor are the bright ones: boxes and pixels agree.
    x1, y1, x2, y2 = (expected[1:] * 50).round().int().tolist()
    assert ds.images[0, :, y1 + 2:y2 - 2, x1 + 2:x2 - 2].min() > 200
    # Validation checks the box against the displayed size (y 60..90 does not fit the stored 60 rows).
    shutil.copytree(split, tmp_path / "val")
    report = run_validation(tmp_path, tmp_path / "reports", 50, ["banana"], strict=False)
    assert report["splits"]["train"]["box_y_range"] == [BOX[1], BOX[3]]


def test_predictions_come_back_in_the_displayed_frame(model_file, tmp_path):
    """The EXIF JPEG predicts exactly as an upright copy of its displayed pixels does, and not as its
    stored (sideways) pixels would."""
    photo = exif_jpeg(tmp_path / "photo.jpg", 6)
    upright = tmp_path / "upright.png"
    read_rgb(photo).save(upright)  # the same decoded pixels, upright, no EXIF
    sideways = tmp_path / "sideways.png"
    with Image.open(photo) as stored:
        stored.convert("RGB").save(sideways)
    rotated, same, other = predict_files([photo, upright, sideways], model_file, threshold=0.0, image_size=64)
    assert (rotated["width"], rotated["height"]) == DISPLAYED_SIZE
    assert rotated["detections"] and rotated["detections"] == same["detections"]
    assert rotated["detections"] != other["detections"]
    assert all(d["box"][2] <= DISPLAYED_SIZE[0] and d["box"][3] <= DISPLAYED_SIZE[1] for d in rotated["detections"])


# ---------------------------------------------------------------------------------------------
# modes

def test_16bit_greyscale_keeps_its_values(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))  # 256 wide, 8 tall
    path = tmp_path / "grey16.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really 16-bit on disk
    a = np.asarray(read_rgb(path))
    assert a.shape == (8, 256, 3) and (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    row = a[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    assert abs(row.mean() - 127.5) < 2  # not almost all white, as PIL's own conversion makes it
    np.testing.assert_allclose(row, np.arange(256), atol=1)


@pytest.mark.parametrize("mode, values, expected", [
    ("I", [0, 1000, 65535], [0, 4, 255]),        # 32-bit holding 16-bit data
    ("I", [-5, 0, 5], [0, 128, 255]),             # any other range is stretched
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),        # float in [0, 1]
    ("F", [0.0, 100.0, 255.0], [0, 100, 255]),    # float already in 8-bit range
])
def test_wide_modes_scale_to_8bit(mode, values, expected, tmp_path):
    dtype = np.int32 if mode == "I" else np.float32
    img = Image.fromarray(np.array([values], dtype=dtype))
    assert img.mode == mode
    path = tmp_path / "wide.tif"
    img.save(path)
    assert [p[0] for p in np.asarray(read_rgb(path))[0]] == expected


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                       ("CMYK", "JPEG"), ("1", "PNG"), ("RGB", "BMP")])
def test_other_modes_become_rgb(mode, fmt, tmp_path):
    grey = 255 if mode == "1" else 200  # 1-bit: white, as a dithered grey would not be even
    path = tmp_path / f"img.{fmt.lower()}"
    img = Image.new("RGB", (12, 10), (grey,) * 3)
    # An adaptive palette holds the grey itself (the default web palette would round it).
    (img.quantize() if mode == "P" else img.convert(mode)).save(path, format=fmt)
    out = read_rgb(path)
    assert out.mode == "RGB" and out.size == (12, 10)
    assert np.abs(np.asarray(out).astype(int) - grey).max() <= 6


def test_animated_gif_png_and_webp_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    for name in ("anim.gif", "anim.png", "anim.webp"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
        with Image.open(tmp_path / name) as img:
            assert getattr(img, "n_frames", 1) == 3
        r, g, b = read_rgb(tmp_path / name).getpixel((8, 8))
        assert r > 200 and g < 40 and b < 40, name


# ---------------------------------------------------------------------------------------------
# the pixel limit (decompression bombs)

def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` 1-bit pixels: a few dozen bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path):
    pil_limit = Image.MAX_IMAGE_PIXELS
    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageTooLarge) as info:  # far above the limit: PIL's own refusal, reworded
        read_image(bomb, 64)
    assert str(info.value) == (f"{bomb}: image too large (100000x100000 pixels; the limit is "
                               f"data.max_image_pixels = 64000000)")
    # Just above the limit (where PIL only warns) is refused too.
    small = Image.new("RGB", (100, 80))
    small.save(tmp_path / "big.png")
    with pytest.raises(ImageTooLarge, match=r"big\.png: image too large \(100x80 pixels; the limit is "
                                            r"data\.max_image_pixels = 5000\)"):
        read_image(tmp_path / "big.png", 64, max_pixels=5000)
    assert read_image(tmp_path / "big.png", 64, max_pixels=8000)[1] == (100, 80)
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's own guard is left as it was


def test_the_limit_is_a_param_of_validate(tmp_path, capsys):
    data = tmp_path / "raw"
    write_split(data / "train", 2, size=32)
    write_split(data / "val", 2, size=32, seed=1)
    args = ["validate", "--data", str(data), "--out", str(tmp_path / "reports"), "--params", str(ROOT / "params.yaml"),
            "-S", "data.image_size=32"]
    assert cli_main(args) == 0
    assert cli_main(args + ["-S", "data.max_image_pixels=1000"]) == 1
    err = capsys.readouterr().err
    assert "train/images/0.png: image too large (32x32 pixels; the limit is data.max_image_pixels = 1000)" in err


# ---------------------------------------------------------------------------------------------
# ssd predict over many files

def test_predict_a_folder_skips_bad_files_and_exits_1(model_file, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 30)).save(folder / "b.png")
    exif_jpeg(folder / "a.jpg", 8)
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(folder / "c.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image, and not taken for one")
    bomb_png(folder / "huge.png", 9000, 9000)
    out = tmp_path / "out"
    rc = cli_main(["predict", str(folder), str(tmp_path / "missing.jpg"), "--model", str(model_file),
                   "--params", str(ROOT / "params.yaml"), "-S", "data.image_size=64",
                   "-S", "data.max_image_pixels=1000000", "--threshold", "0.0", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    results = json.loads(captured.out)
    assert [Path(r["image"]).name for r in results] == ["a.jpg", "b.png", "c.png"]  # sorted, by extension
    assert (results[0]["width"], results[0]["height"]) == DISPLAYED_SIZE
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    with Image.open(out / "a.png") as annotated:
        assert annotated.size == DISPLAYED_SIZE  # drawn on the displayed picture
    err = captured.err.splitlines()
    assert any("broken.png: cannot be read as an image" in line for line in err)
    assert any("huge.png: image too large (9000x9000 pixels" in line for line in err)
    assert any("missing.jpg: image not found" in line for line in err)
    assert not any("notes.txt" in line for line in err)
    assert "3 input(s) skipped, 3 image(s) predicted" in err[-1]


def test_predict_an_empty_folder_is_an_error(model_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = cli_main(["predict", str(tmp_path / "empty"), "--model", str(model_file)])
    assert rc == 1 and "empty: folder holds no image files" in capsys.readouterr().err


def test_served_model_reads_exif_and_keeps_the_limit(model_file):
    from mlflow.pyfunc import PythonModelContext

    import pandas as pd
    from ssd.mlops.pyfunc import TinySSDModel, encode_image

    model = TinySSDModel()
    model.load_context(PythonModelContext(artifacts={"weights": str(model_file)},
                                          model_config={"image_size": 64, "max_image_pixels": 6000,
                                                                        "nms_threshold": 0.5, "threshold": 0.9}))
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    displayed_picture().transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", exif=exif)
    table = model.predict(None, pd.DataFrame({"image": [encode_image(buffer.getvalue())]}), params={"threshold": 0.0})
    assert len(table) and (table.xmax <= DISPLAYED_SIZE[0]).all() and (table.ymax <= DISPLAYED_SIZE[1]).all()
    assert (table.ymax > DISPLAYED_SIZE[0]).any()  # some box reaches below the stored image's 60 rows
    big = io.BytesIO()
    Image.new("L", (100, 61)).save(big, format="PNG")
    with pytest.raises(ImageTooLarge, match=r"image #0: image too large \(100x61 pixels"):
        model.predict(None, pd.DataFrame({"image": [encode_image(big.getvalue())]}))


# ---------------------------------------------------------------------------------------------
# label.csv errors name the file (and the line)

LABEL_DAMAGE = {
    "empty": (b"", r"label\.csv: empty file"),
    "blank": (b"\n  \n", r"label\.csv: empty file"),
    "latin-1": (HEADER.encode() + "0.png,0,1,1,5,5\nd\xe9j\xe0.png,0,1,1,5,5\n".encode("latin-1"),
                r"label\.csv line 3: not UTF-8 text \(byte 0xe9\)"),
    "too many fields": (HEADER.encode() + b"0.png,0,1,1,5,5\n1.png,0,1,1,5,5,9\n",
                        r"label\.csv: malformed CSV \(.*line 3.*\)"),
    "not a number": (HEADER.encode() + b"0.png,0,1,1,5,5\n1.png,0,1,one,5,5\n",
                     r"label\.csv row 3: .*ymin.*'one'"),
}


@pytest.mark.parametrize("kind", list(LABEL_DAMAGE))
def test_label_file_errors_name_the_file(kind, tmp_path):
    data = tmp_path / "raw"
    write_split(data / "train", 2, size=32)
    write_split(data / "val", 2, size=32, seed=1)
    content, pattern = LABEL_DAMAGE[kind]
    (data / "train" / "label.csv").write_bytes(content)
    path = str(data / "train" / "label.csv")
    with pytest.raises(ValueError, match=pattern) as info:  # the training and evaluation loader
        load_dataset(data, "train", 32)
    assert str(info.value).startswith(path) and "\n" not in str(info.value)
    if kind not in ("not a number",):
        with pytest.raises(ValueError, match=pattern):
            read_labels(path)
    with pytest.raises(ValueError, match=pattern):  # validation lists it among its problems
        run_validation(data, tmp_path / "reports", 32, ["banana"])


def test_a_bom_is_not_part_of_the_header(tmp_path):
    path = tmp_path / "label.csv"
    path.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + b"0.png,0,1,1,5,5\n")
    assert list(read_labels(path).columns) == HEADER.strip().split(",")
