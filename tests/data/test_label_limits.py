"""Bounded resources for any dataset input: label files (boxes per image, line length, rows) are refused
in one line naming file, row or image and value, by validate and by the reader, before any large
allocation; validate summarises a flood of problems; decoding one image costs a few bytes a pixel; and
the digest the provenance records covers every label file.

Memory is measured in a subprocess (ru_maxrss, the peak RSS, after the imports) with an address-space
limit (RLIMIT_AS) a little above what the imports mapped, so an allocation of gigabytes fails there
instead of taking the machine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ssd.cli import main as cli_main
from ssd.data import checks, labels as label_files  # attributes looked up in the tests: the file imports on old code
from ssd.data.checks import run_validation
from ssd.data.dataset import load_dataset
from ssd.mlops.provenance import provenance
from ssd.util.settings import Settings
from tiny_data import write_dataset, write_split

ROOT = Path(__file__).resolve().parents[2]
HEADER = "img_name,label,xmin,ymin,xmax,ymax\n"

# Run in a subprocess: import the data floor, then measure (and cap) what one call adds.
BOUNDED = r"""
import json, resource, sys
from ssd.data.checks import validate
from ssd.data.dataset import load_dataset
from ssd.data.images import read_image

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

vm_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB of room
calls = {"validate": lambda path: validate(path, 32, ["banana"]),
         "reader": lambda path: load_dataset(path, "train", 32),
         "read_image": lambda path: read_image(path, 256)}
path, results, before = sys.argv[1], {}, peak_mb()
for name in sys.argv[2:]:
    try:
        calls[name](path)
        error = None
    except MemoryError:
        error = "MemoryError"
    except ValueError as exc:
        error = str(exc)
    results[name] = {"error": error, "added_mb": peak_mb() - before}  # the peak so far, over the imports'
print(json.dumps(results))
"""


def bounded(path: Path, *calls: str) -> dict:
    """``{call: {"error": message or None, "added_mb": peak RSS added so far}}``, the calls made in turn
    in one fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    done = subprocess.run([sys.executable, "-c", BOUNDED, str(path), *calls], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def small_dataset(tmp_path: Path) -> Path:
    data = tmp_path / "raw"
    write_split(data / "train", 2, size=32)
    write_split(data / "val", 2, size=32, seed=1)
    return data


def test_the_limits_default_to_params_yaml():
    data = Settings.from_params(yaml.safe_load((ROOT / "params.yaml").read_text())).data
    assert label_files.LabelLimits.of(data) == label_files.LabelLimits()


def test_40k_boxes_on_one_image_are_refused_by_validate_and_the_reader(tmp_path):
    data = small_dataset(tmp_path)
    labels = data / "train" / "label.csv"
    with open(labels, "a") as f:
        f.writelines(f"1.png,0,{i % 7},{i % 5},{20 + i % 9},{20 + i % 11}\n" for i in range(40_000))
    assert labels.stat().st_size < 1 << 20
    expected = (f"{labels}: image '1.png' has 40001 boxes (the first at row 3); "
                f"the limit is data.max_boxes_per_image = 1000")
    result = bounded(data, "validate", "reader")
    assert expected in result["validate"]["error"] and result["reader"]["error"] == expected, result
    assert result["reader"]["added_mb"] < 200, result  # training on it tried to allocate 27.9 GB


def long_line_dataset(tmp_path: Path, megabytes: int) -> Path:
    """A train label file whose second line is one ``megabytes`` MB name, written a chunk at a time."""
    data = small_dataset(tmp_path)
    with open(data / "train" / "label.csv", "w") as f:
        f.write(HEADER)
        for _ in range(megabytes):
            f.write("A" * (1 << 20))
        f.write(".png,0,1,1,5,5\n0.png,0,1,1,5,5\n")
    return data


def test_a_200mb_line_is_refused_in_one_short_line_without_reading_it(tmp_path):
    data = long_line_dataset(tmp_path, 200)
    labels = data / "train" / "label.csv"
    expected = f"{labels} line 2: longer than data.max_label_line_bytes = 512 bytes"
    result = bounded(data, "validate", "reader")
    for call in ("validate", "reader"):  # before: 2.4 GB of RSS and a 200 MB message
        assert expected in result[call]["error"] and len(result[call]["error"]) < 1000, result
    assert result["reader"]["added_mb"] < 64 and "\n" not in result["reader"]["error"], result


def test_more_rows_than_the_limit_are_refused(tmp_path):
    data = small_dataset(tmp_path)
    labels = data / "train" / "label.csv"
    limits = label_files.LabelLimits(max_label_rows=5)
    with open(labels, "a") as f:
        f.writelines(f"0.png,0,1,1,{10 + i},20\n" for i in range(3))  # 5 rows: at the limit
    assert len(label_files.read_labels(labels, limits)) == 5
    with open(labels, "a") as f:
        f.write("1.png,0,2,2,20,20")  # the sixth, without a final newline
    expected = f"{labels}: more than data.max_label_rows = 5 rows"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_dataset(data, "train", 32, limits=limits)
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_validation(data, tmp_path / "reports", 32, ["banana"], limits=limits)


def test_the_validate_stage_reads_the_limits_from_params(tmp_path, capsys):
    data = small_dataset(tmp_path)
    labels = data / "train" / "label.csv"
    with open(labels, "a") as f:
        f.write("0.png,0,2,2,20,20\n0.png,0,3,3,20,20\n")  # 0.png: 3 boxes, 1.png: 1
    args = ["validate", "--data", str(data), "--out", str(tmp_path / "reports"), "--params", str(ROOT / "params.yaml"),
            "-S", "data.image_size=32"]
    assert cli_main(args) == 0
    assert cli_main(args + ["-S", "data.max_boxes_per_image=2"]) == 1
    assert (f"{labels}: image '0.png' has 3 boxes (the first at row 2); the limit is data.max_boxes_per_image = 2"
            in capsys.readouterr().err)
    assert cli_main(args + ["-S", "data.max_label_rows=3"]) == 1
    assert f"{labels}: more than data.max_label_rows = 3 rows" in capsys.readouterr().err
    assert cli_main(args + ["-S", "data.max_label_line_bytes=64"]) == 0
    assert cli_main(args + ["-S", "data.max_label_line_bytes=63"]) == 1
    assert "expected an integer >= 64" in capsys.readouterr().err


def test_thousands_of_bad_rows_are_summarised(tmp_path):
    data = small_dataset(tmp_path)
    labels = data / "train" / "label.csv"
    with open(labels, "a") as f:
        f.writelines(f"missing{i}.png,0,1,1,5,5\n" for i in range(5000))  # as a 1M-row file with errors would
    with pytest.raises(ValueError) as info:
        run_validation(data, tmp_path / "reports", 32, ["banana"])
    lines = str(info.value).splitlines()
    total = int(re.match(r"(\d+) problem\(s\) in ", lines[0])[1])
    assert total == 5000 and len(lines) < 100  # before: a line for each
    more = int(re.fullmatch(r"  \.\.\. and (\d+) more problems", lines[-1])[1])
    assert len(lines) == checks.LISTED_PROBLEMS + 2 and more == total - checks.LISTED_PROBLEMS
    assert lines[1] == f"  {labels} row 4: image {data / 'train' / 'images' / 'missing0.png'} does not exist"


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_decoding_a_wide_image_costs_a_few_bytes_a_pixel(mode, tmp_path):
    side = 4000
    values = np.zeros((side, side), dtype=np.uint16 if mode == "I;16" else np.float32)
    values[::97] = 40000 if mode == "I;16" else 0.75
    path = tmp_path / ("wide.png" if mode == "I;16" else "wide.tif")
    Image.fromarray(values).save(path, **({"compression": "tiff_deflate"} if mode == "F" else {}))
    del values
    result = bounded(path, "read_image")["read_image"]
    bytes_per_pixel = result["added_mb"] * (1 << 20) / side**2
    # 16-bit: 2 bytes decoded + 1 of 8-bit grey; float: 4 + 1 (before: float64 copies, ~25 bytes a pixel)
    assert result["error"] is None and bytes_per_pixel < 6, result


def test_one_changed_digit_in_a_label_file_changes_the_recorded_data_hash(tmp_path):
    raw = tmp_path / "raw"
    root = write_dataset(raw, train=3, val=2, size=32)
    (raw / "manifest.json").write_text("{}")  # as fetch leaves it: data/raw is what DVC tracks
    labels = root / "bananas_val" / "label.csv"
    before = labels.stat()
    hashes = [provenance(root, cwd=tmp_path)["data_hash"]]
    for _ in range(2):
        data = bytearray(labels.read_bytes())
        digit = data.index(b"\n") + len(b"\n0.png,0,")  # xmin of the first row
        data[digit] = ord("0") + (data[digit] - ord("0") + 1) % 10
        labels.write_bytes(bytes(data))
        os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
        hashes.append(provenance(root, cwd=tmp_path)["data_hash"])
    assert labels.stat().st_size == before.st_size
    assert len(set(hashes)) == 3 and all(h.startswith("dvc-md5:") for h in hashes)


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 20])
def test_the_measuring_read_finds_bad_utf8_wherever_the_chunks_cut(chunk, tmp_path):
    path = tmp_path / "label.csv"
    good = (HEADER + "épée.png,0,1,1,5,5\n€😀.png,0,1,1,5,5\n").encode()
    path.write_bytes(good)
    limits = label_files.LabelLimits()
    with open(path, "rb") as f:
        assert label_files._scan(f, path, limits, chunk) == (len(good), True)
    path.write_bytes(good + "d\xe9j\xe0.png,0,1,1,5,5\n".encode("latin-1"))
    with open(path, "rb") as f, pytest.raises(ValueError, match=r"label\.csv line 4: not UTF-8 text \(byte 0xe9\)"):
        label_files._scan(f, path, limits, chunk)
