"""Loader paths: the split in memory and the split streamed give the same batches; labels padded per
batch; decoding in worker processes; memory flat in the split's size when streamed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd.data import dataset as ds
from ssd.data.dataset import (DetectionDataset, StreamDataset, index_split, make_loader, open_split,
                              resolve_loader)
from ssd.data.layout import IMAGES_DIR, LABEL_FILE
from tiny_data import grow, write_dataset

S = 32


def crowd(split: Path, name: str, boxes: int) -> None:
    """Give ``name`` ``boxes`` more label rows (small boxes in its corner)."""
    with open(split / LABEL_FILE, "a") as f:
        f.writelines(f"{name},0,{i % 8},{i % 8},{i % 8 + 4},{i % 8 + 4}\n" for i in range(boxes))


@pytest.fixture
def data(tmp_path):
    data = write_dataset(tmp_path, train=11, val=2)
    crowd(data / "bananas_train", "3.png", 2)  # 3.png has 3 boxes, every other image 1
    return data


def batches(dataset, **kw):
    loader = make_loader(dataset, 4, seed=kw.pop("seed", 7), **kw)
    loader.sampler.set_epoch(2)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_memory_and_stream_give_identical_batches(data, workers, rank):
    memory = open_split(data, "train", S, loader="memory")
    stream = open_split(data, "train", S, loader="stream")
    assert isinstance(memory, DetectionDataset) and isinstance(stream, StreamDataset)
    a = batches(memory, rank=rank, world_size=2)
    b = batches(stream, rank=rank, world_size=2, num_workers=workers)
    assert len(a) == len(b) == 2
    for (ia, la), (ib, lb) in zip(a, b):
        assert torch.equal(ia, ib) and ia.dtype == torch.uint8
        assert torch.equal(la, lb) and la.dtype == torch.float32
    assert memory.fingerprint() == stream.fingerprint()


def test_labels_are_padded_per_batch(data):
    crowd(data / "bananas_train", "3.png", 997)  # 1000 boxes: the limit
    dataset = open_split(data, "train", S, loader="memory")
    crowded = dataset.names.index("3.png")
    widths = {tuple(sorted(idx)): labels.shape[1]
              for idx, (_, labels) in zip([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]],
                                          make_loader(dataset, 4, shuffle=False))}
    assert widths == {(0, 1, 2, 3): 1000 if crowded < 4 else 1, (4, 5, 6, 7): 1000 if 4 <= crowded < 8 else 1,
                      (8, 9, 10): 1000 if crowded >= 8 else 1}
    # The split holds its rows once (R + one padding row), not N x 1000 of them.
    assert dataset.rows.shape == (10 + 1000 + 1, 5)
    _, rows = dataset[crowded]
    assert rows.shape == (1000, 5)


def test_padding_does_not_change_the_loss(data):
    # Per-batch padding is narrower than the split's: the anchors' targets must not depend on it.
    from ssd.core.anchors import multibox_target
    from ssd.core.model import TinySSD, as_input

    dataset = open_split(data, "train", 64, loader="memory")
    images, labels = dataset.__getitems__([2, 3, 4])
    assert labels.shape[1] == 3
    wide = torch.cat((labels, torch.full((3, 5, 5), -1.0)), dim=1)
    torch.manual_seed(0)
    anchors, _, _ = TinySSD(num_classes=1, image_size=64)(as_input(images, "cpu"))
    for a, b in zip(multibox_target(anchors, labels), multibox_target(anchors, wide)):
        assert torch.equal(a, b)


def test_parallel_decode_matches_one_process(data, monkeypatch):
    index = index_split(data / "bananas_train")
    one = DetectionDataset(index, S, workers=0)
    monkeypatch.setattr(ds, "PARALLEL_DECODE_MIN_IMAGES", 1)
    rng = torch.get_rng_state()
    many = DetectionDataset(index, S, workers=2)
    assert torch.equal(torch.get_rng_state(), rng)  # decoding leaves the model's RNG alone
    assert torch.equal(one.images, many.images) and torch.equal(one.rows, many.rows)


def test_a_worker_error_is_one_line(data, monkeypatch):
    (data / "bananas_train" / IMAGES_DIR / "5.png").write_bytes(b"not an image")
    monkeypatch.setattr(ds, "PARALLEL_DECODE_MIN_IMAGES", 1)
    with pytest.raises(ValueError, match=r"^\S*5.png: cannot be read as an image[^\n]*$"):
        DetectionDataset(index_split(data / "bananas_train"), S, workers=2)


def test_missing_image_is_refused_before_streaming(data):
    (data / "bananas_train" / IMAGES_DIR / "4.png").unlink()
    with pytest.raises(FileNotFoundError, match="4.png: image listed in the label file is missing"):
        open_split(data, "train", S, loader="stream")


def test_auto_holds_small_splits_in_memory():
    per_image = 3 * 256 * 256
    assert resolve_loader("auto", ds.MEMORY_LOADER_MAX_BYTES // per_image, 256) == "memory"
    assert resolve_loader("auto", ds.MEMORY_LOADER_MAX_BYTES // per_image + 1, 256) == "stream"
    assert resolve_loader("stream", 1, 256) == "stream" and resolve_loader("memory", 10**9, 256) == "memory"
    with pytest.raises(ValueError, match="data.loader 'disk'"):
        resolve_loader("disk", 1, 256)


FIRST_STEP = r"""
import json, re, sys
from ssd.data.dataset import make_loader, open_split
dataset = open_split(sys.argv[1], "train", 256, loader=sys.argv[2])
loader = make_loader(dataset, 32, num_workers=int(sys.argv[3]))
next(iter(loader))
# VmHWM, not ru_maxrss: the latter survives exec, so it would be the parent's (pytest's) peak.
print(json.dumps(int(re.search(r"VmHWM:\s*(\d+)", open("/proc/self/status").read()).group(1))))
"""


def peak_rss_kib(data: Path, loader: str, workers: int) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", FIRST_STEP, str(data), loader, str(workers)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # three interpreters importing torch: ~25 s on 2 cores
def test_streamed_memory_is_flat_in_the_split_size(tmp_path):
    small = write_dataset(tmp_path / "small", train=32, val=1, size=256)
    large = write_dataset(tmp_path / "large", train=32, val=1, size=256)
    grow(large, 20)  # 640 images: 126 MB decoded
    stream = [peak_rss_kib(d, "stream", 1) for d in (small, large)]
    assert stream[1] <= 1.25 * stream[0], stream
    # The measure can tell: the split in memory grows by its decoded size.
    memory = peak_rss_kib(large, "memory", 0)
    assert memory - stream[1] > 100_000, (memory, stream)


def test_one_box_per_image_gathers_the_same_batches(tmp_path):
    # Every image with as many boxes (the banana data) takes the one-gather path: the same batches.
    data = write_dataset(tmp_path, train=9, val=1)
    memory, stream = (open_split(data, "train", S, loader=kind) for kind in ("memory", "stream"))
    assert memory._same_count
    for (ia, la), (ib, lb) in zip(batches(memory), batches(stream)):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and la.shape[1] == 1
