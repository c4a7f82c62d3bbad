"""Accuracy parity: the fast training default against plain fp32 NCHW, same data, seed and epochs.

    python -m benchmarks.parity [--train 384] [--val 96] [--image-size 128] [--epochs 8] [--precision auto]

Generates bananas (``ssd.synthetic``), trains TinySSD with ``ssd.train.train_one_epoch`` twice from
the same initial weights and data order — plain fp32 NCHW, then the default (``train.precision``
resolved here, channels-last) — and prints validation mAP@0.5 of each and their difference.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch


def train_and_score(root: Path, *, image_size: int, epochs: int, precision: str, channels_last: bool,
                    seed: int = 0) -> dict[str, Any]:
    from ssd.data import load_dataset, make_loader
    from ssd.evaluate import MAX_DETECTIONS, coco_map, run_model
    from ssd.model import TinySSD
    from ssd.train import AUTOCAST_DTYPES, resolve_precision, train_one_epoch

    device = torch.device("cpu")
    precision = resolve_precision(precision, device)
    torch.manual_seed(seed)
    train, val = load_dataset(root, "train", image_size), load_dataset(root, "val", image_size)
    model = TinySSD(1, image_size=image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    loader = make_loader(train, 32, shuffle=True, seed=seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        metrics = train_one_epoch(model, loader, optimizer, scaler, epoch=epoch, device=device,
                                  autocast_dtype=AUTOCAST_DTYPES[precision], channels_last=channels_last)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        preds, _ = run_model(model, val.images, val.labels, 0.5)
    targets = [lab for lab in val.labels]
    assert all(len(p) <= MAX_DETECTIONS for p in preds)
    return {"precision": precision, "channels_last": channels_last, "train_seconds": seconds,
            "final_loss": metrics["loss"], **coco_map(preds, targets)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=384)
    parser.add_argument("--val", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--precision", default="auto", help="the fast side's train.precision (default: auto)")
    args = parser.parse_args(argv)

    from ssd.distributed import keep_freed_memory
    from ssd.synthetic import generate_archive

    keep_freed_memory()  # as `ssd train` does; it changes no arithmetic
    with tempfile.TemporaryDirectory() as tmp:
        generate_archive(Path(tmp) / "bananas.zip", seed=0, train=args.train, val=args.val)
        with zipfile.ZipFile(Path(tmp) / "bananas.zip") as zf:
            zf.extractall(tmp)
        root = Path(tmp) / "banana-detection"
        common = {"image_size": args.image_size, "epochs": args.epochs}
        plain = train_and_score(root, precision="fp32", channels_last=False, **common)
        fast = train_and_score(root, precision=args.precision, channels_last=True, **common)
    result = {"settings": vars(args), "fp32_nchw": plain, "default": fast,
              "map_50_difference": fast["map_50"] - plain["map_50"]}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
