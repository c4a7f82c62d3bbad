"""Accuracy parity: the fast training default against plain fp32 NCHW, same data, seeds and epochs.

    python -m benchmarks.parity [--seeds 0 1 2] [--epochs 16] [--variants default bf16 nudged] [--out parity.json]

Generates bananas (``ssd.data.synthetic``), and for every seed trains TinySSD with
``ssd.engine.loop.train_one_epoch`` from the same initial weights and data order as plain fp32 NCHW (the
reference) and as each variant, then prints validation mAP@0.5 of each, their differences from the
reference per seed and the mean difference over the seeds. Variants: ``default`` (``train.precision``
resolved here, channels-last), ``fp32``/``bf16``/``fp16`` (channels-last at that precision) and
``nudged``: the reference's own arithmetic from initial weights one float step away, which shows how
far rounding alone moves a run of this length (the resolution of the comparison).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch


# name -> train_and_score settings; precision None: the --precision given (the params' default).
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32_nchw": {"precision": "fp32", "channels_last": False},
    "default": {"precision": None, "channels_last": True},
    "fp32": {"precision": "fp32", "channels_last": True},
    "bf16": {"precision": "bf16", "channels_last": True},
    "fp16": {"precision": "fp16", "channels_last": True},
    "nudged": {"precision": "fp32", "channels_last": False, "nudge": True},
}


def train_and_score(root: Path, *, image_size: int, epochs: int, precision: str, channels_last: bool,
                    seed: int = 0, nudge: bool = False) -> dict[str, Any]:
    from ssd.core.model import TinySSD
    from ssd.data.dataset import load_dataset, make_loader
    from ssd.engine.evaluation import run_model
    from ssd.engine.metrics import MAX_DETECTIONS, coco_map
    from ssd.engine.loop import train_one_epoch
    from ssd.engine.precision import AUTOCAST_DTYPES, resolve_precision

    device = torch.device("cpu")
    precision = resolve_precision(precision, device)
    torch.manual_seed(seed)
    train, val = load_dataset(root, "train", image_size), load_dataset(root, "val", image_size)
    model = TinySSD(1, image_size=image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if nudge:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
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
    assert all(len(p) <= MAX_DETECTIONS for p in preds)
    return {"precision": precision, "channels_last": channels_last, "train_seconds": round(seconds, 1),
            "final_loss": metrics["loss"], **coco_map(preds, list(val.labels))}


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """mAP@0.5 per seed of every variant, and each variant's difference from ``fp32_nchw``."""
    reference = [r["map_50"] for r in runs["fp32_nchw"]]
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        maps = [r["map_50"] for r in results]
        differences = [m - ref for m, ref in zip(maps, reference)]
        summary[name] = {"map_50": maps, "mean_map_50": statistics.fmean(maps),
                         "difference": differences, "mean_difference": statistics.fmean(differences)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=384)
    parser.add_argument("--val", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precision", default="auto", help="the default variant's train.precision (default: auto)")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                        help="compared with plain fp32 NCHW (default: default)")
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    args = parser.parse_args(argv)

    from ssd.engine.distributed import keep_freed_memory
    from ssd.util.files import atomic_write_text
    from ssd.data.synthetic import generate_archive

    keep_freed_memory()  # as `ssd train` does; it changes no arithmetic
    variants = {"fp32_nchw": VARIANTS["fp32_nchw"], **{name: VARIANTS[name] for name in args.variants}}
    variants = {name: {**v, "precision": v.get("precision") or args.precision} for name, v in variants.items()}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        generate_archive(Path(tmp) / "bananas.zip", seed=0, train=args.train, val=args.val)
        with zipfile.ZipFile(Path(tmp) / "bananas.zip") as zf:
            zf.extractall(tmp)
        root = Path(tmp) / "banana-detection"
        for seed in args.seeds:
            for name, variant in variants.items():
                result = train_and_score(root, image_size=args.image_size, epochs=args.epochs, seed=seed, **variant)
                print(f"seed {seed} {name}: mAP@0.5 {result['map_50']:.4f} ({result['train_seconds']} s)",
                      flush=True)
                runs[name].append(result)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "runs": runs, "summary": compare(runs)}
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
