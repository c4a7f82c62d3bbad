"""Benchmark the ``ssd`` package against the seed's own code, side by side in one run.

    pip install -e '.[bench]' && pip install --no-deps d2l==1.0.3
    python -m benchmarks.bench [--smoke] [--out reports/bench.json] [--device cpu|cuda]

The seed is the chapter's code (:mod:`benchmarks.seed`: the book's TinySSD, loss and ``predict`` on
the ``d2l`` package's ``multibox_prior``/``multibox_target``/``multibox_detection``). Measured, on
the benchmark's device (everything is built there; timers synchronize CUDA):

* training examples/sec of one step at batch 32, 256x256: the seed's (fp32, NCHW, ``float()``
  metrics) vs ours (``ssd.engine.step.train_step``, the training's own step, with the training
  defaults: what ``train.precision`` and ``train.channels_last`` of params.yaml resolve to here,
  and the process setup of ``ssd train``). Each side runs in its own process, whose ``ru_maxrss`` is that
  run's peak memory; seed and ours alternate for ``--rounds`` rounds and the best of each counts,
  so a burst of load on a shared machine hits both alike;
* ``multibox_detection`` and ``multibox_target`` per call;
* prediction throughput over a folder of images: ``ssd predict``'s path (one model load, batched)
  vs the chapter's ``predict()`` on each image;
* ``dvc repro`` with nothing changed, in ``--project`` if its pipeline is up to date;
* the CPU's name and flags (native bf16 or not), torch's threads.

Every figure is measured; ratios are ours over the seed's (speed) and the seed's over ours (time).
``--smoke`` shrinks everything (batch 4, 64x64, one step, 4 images) so it runs in seconds.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import require_d2l
from .timing import random_labels, realistic_scores, sync, timed, timed_pair
from .train_speed import bench_train, training_defaults

DEFAULT_OUT = Path("reports/bench.json")
FULL = {"batch_size": 32, "image_size": 256, "train_iters": 3, "iters": 5, "boxes": 10, "images": 64,
        "seed_images": 8, "rounds": 2}
SMOKE = {"batch_size": 4, "image_size": 64, "train_iters": 1, "iters": 1, "boxes": 10, "images": 4,
         "seed_images": 2, "rounds": 1}
# CPU features that decide which kernels run (bf16/fp16 natively or emulated).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


# ----------------------------------------------------------------------------------------------
# In-process measurements

def _anchors(image_size: int, device: torch.device) -> torch.Tensor:
    from ssd.core.model import TinySSD

    return TinySSD(1, image_size=image_size).to(device).anchors


def bench_detection(sizes: dict[str, Any], device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    from ssd.core.anchors import multibox_detection

    d2l = require_d2l()
    B, anchors = sizes["batch_size"], _anchors(sizes["image_size"], device)
    A = anchors.shape[1]
    probs = realistic_scores(B, A, gen).to(device)
    offsets = (0.1 * torch.randn(B, A * 4, generator=gen)).to(device)
    ours = timed(lambda: multibox_detection(probs, offsets, anchors), sizes["iters"], device)
    # The book loops over images and its NMS walks all A anchors, low scores included (seconds per
    # image on a CPU), so it is timed once on the first few images: its cost per image is the same.
    n = min(B, 4)
    seed = timed(lambda: d2l.multibox_detection(probs[:n], offsets[:n], anchors), 1, device, warmup=0)
    ours_ms, seed_ms = 1e3 * ours["best_s"] / B, 1e3 * seed["best_s"] / n
    return {"batch_size": B, "anchors": A, "ours_ms_per_image": ours_ms, "seed_ms_per_image": seed_ms,
            "seed_images_timed": n, "above_floor_per_image": float((probs[:, 1] >= 0.01).sum()) / B,
            "speedup_vs_seed": seed_ms / ours_ms}


def bench_target(sizes: dict[str, Any], device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    from ssd.core.anchors import multibox_target

    d2l = require_d2l()
    anchors = _anchors(sizes["image_size"], device)
    labels = random_labels(sizes["batch_size"], sizes["boxes"], gen).to(device)
    ours, seed = timed_pair(lambda: multibox_target(anchors, labels), lambda: d2l.multibox_target(anchors, labels),
                            sizes["iters"], device)
    return {"batch_size": sizes["batch_size"], "boxes": sizes["boxes"], "ours_ms": 1e3 * ours["best_s"],
            "seed_ms": 1e3 * seed["best_s"], "speedup_vs_seed": seed["best_s"] / ours["best_s"]}


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` generated banana pictures (PNG, ``size`` square) in ``folder``."""
    import numpy as np
    from PIL import Image

    from ssd.data.synthetic import render_image

    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(render_image(np.random.default_rng(i), size).image).save(path)
        paths.append(path)
    return paths


def bench_predict(sizes: dict[str, Any], device: torch.device, model: Path | None) -> dict[str, Any]:
    """Images/sec over a folder: ``ssd predict``'s path (model load included, batched) vs the chapter's
    ``predict()`` on each image (its net already in memory), with the same weights."""
    from ssd.core.model import TinySSD, save_model
    from ssd.engine.prediction import predict_files

    trained = model is not None and model.is_file()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        if trained:
            shutil.copy(model, weights)
        else:
            torch.manual_seed(0)
            save_model(TinySSD(1), weights)
        paths = write_images(Path(tmp), sizes["images"], sizes["image_size"])
        sync(device)
        start = time.perf_counter()
        predict_files(paths, weights, threshold=0.9, image_size=sizes["image_size"], device=device)
        sync(device)
        ours_s = time.perf_counter() - start
        n = min(sizes["seed_images"], len(paths))
        seed_s = _seed_predict_seconds(paths[:n], weights, device)
    ours_ips, seed_ips = len(paths) / ours_s, n / seed_s
    return {"weights": str(model) if trained else "untrained (scores near 0.5 everywhere: a worst case for NMS)",
            "images": len(paths), "ours_images_per_sec": ours_ips, "seed_images_timed": n,
            "seed_images_per_sec": seed_ips, "speedup_vs_seed": ours_ips / seed_ips}


def _seed_predict_seconds(paths: list[Path], weights: Path, device: torch.device) -> float:
    """Seconds for the chapter's ``predict()`` over ``paths``, one image at a time, its net loaded beforehand."""
    import torchvision

    from ssd.core.model import load_model

    from . import seed as book

    seed_net = book.TinySSD(num_classes=1)
    seed_net.load_state_dict(load_model(weights).state_dict())  # the chapter's layer names are ours
    seed_net = seed_net.to(device)

    def seed_run() -> None:
        with torch.no_grad():
            for path in paths:  # the chapter: read one image, predict, keep scores >= threshold
                X = torchvision.io.read_image(str(path)).unsqueeze(0).float().to(device)
                output = book.predict(seed_net, X)
                [row for row in output if float(row[1]) >= 0.9]

    return timed(seed_run, 1, device, warmup=0)["best_s"]


def bench_dvc_repro(project: Path) -> dict[str, Any]:
    """Seconds for ``dvc repro`` in ``project`` when ``dvc status`` says nothing changed."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if not (project / "dvc.yaml").is_file() or not (project / "dvc.lock").is_file():
        return {"seconds": None, "note": f"not measured: no reproduced pipeline in {project} (no dvc.lock)"}
    status = subprocess.run([dvc, "status", "--json"], cwd=project, capture_output=True, text=True, timeout=600)
    changes = json.loads(status.stdout or "{}") if status.returncode == 0 else None
    # `always_changed` stages (the data source check) run every time by design: not a change.
    always = {stage for stage, what in (changes or {}).items() if what == ["always changed"]}
    if changes is None or set(changes) - always:
        return {"seconds": None, "note": f"not measured: the pipeline in {project} is not up to date "
                                         f"(`dvc status` lists changes), so `dvc repro` would run stages"}
    start = time.perf_counter()
    proc = subprocess.run([dvc, "repro"], cwd=project, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"seconds": None, "note": f"not measured: `dvc repro` failed: {proc.stderr.strip()[-300:]}"}
    ran = set(re.findall(r"Running stage '([^']+)'", proc.stdout)) - always
    return {"seconds": seconds, "note": "ran stages (something changed)" if ran else "nothing changed"}


# ----------------------------------------------------------------------------------------------
# The machine

def cpu_info() -> dict[str, Any]:
    """The CPU's name, the flags of :data:`CPU_FLAGS` it has, and whether bf16 is native."""
    from ssd.engine.precision import cpu_has_fast_bf16

    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        import platform

        name = platform.processor() or platform.machine()
    return {"name": name, "flags": [f for f in CPU_FLAGS if f in flags], "bf16_native": cpu_has_fast_bf16(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def run_bench(*, smoke: bool = False, device: torch.device, precisions: list[str] | None = None,
              project: Path = Path("."), model: Path | None = None, with_compile: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement; returns the JSON-ready report."""
    sizes = dict(SMOKE if smoke else FULL)
    defaults = training_defaults(project)
    configs = {"default": {**defaults, "compile": False}}
    for p in precisions or []:
        configs[p] = {**defaults, "precision": p, "compile": False}
    if with_compile:
        configs["default+compile"] = {**defaults, "compile": True}
    report: dict[str, Any] = {"smoke": smoke, "sizes": sizes, "torch": torch.__version__, "device": str(device),
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                              "cpu": cpu_info(), "training_defaults": defaults}
    report["train"] = bench_train(sizes, device, configs, log)
    gen = torch.Generator().manual_seed(0)
    log("multibox_detection ...")
    report["detection"] = bench_detection(sizes, device, gen)
    log("multibox_target ...")
    report["target"] = bench_target(sizes, device, gen)
    log("predict over a folder ...")
    report["predict"] = bench_predict(sizes, device, model)
    log("dvc repro ...")
    report["dvc_repro"] = bench_dvc_repro(project)
    return report


def format_table(report: dict[str, Any]) -> str:
    sz, cpu = report["sizes"], report["cpu"]
    rows = [("measurement", "ours", "seed (d2l)", "ratio")]
    seed = report["train"]["seed"]
    for name, r in report["train"].items():
        if name != "seed":
            layout = "channels_last" if r["channels_last"] else "NCHW"
            rows.append((f"train {name} ({r['precision']}, {layout}), ex/s", f"{r['examples_per_sec']:.1f}",
                         f"{seed['examples_per_sec']:.1f}", f"{r['speedup_vs_seed']:.2f}x"))
            rows.append((f"train {name}, examples per CPU-second", f"{r['examples_per_cpu_sec']:.2f}",
                         f"{seed['examples_per_cpu_sec']:.2f}", f"{r['cpu_speedup_vs_seed']:.2f}x"))
    for name, r in report["train"].items():
        if name != "seed":
            rows.append((f"train peak RSS {name}, MB", f"{r['peak_rss_mb']:.0f}", f"{seed['peak_rss_mb']:.0f}",
                         f"{r['peak_rss_mb'] / seed['peak_rss_mb']:.2f}x"))
    d, t, p = report["detection"], report["target"], report["predict"]
    rows.append((f"multibox_detection, ms/image (B={d['batch_size']})", f"{d['ours_ms_per_image']:.2f}",
                 f"{d['seed_ms_per_image']:.2f}", f"{d['speedup_vs_seed']:.1f}x"))
    rows.append((f"multibox_target, ms ({t['batch_size']}x{t['boxes']} boxes)", f"{t['ours_ms']:.2f}",
                 f"{t['seed_ms']:.2f}", f"{t['speedup_vs_seed']:.1f}x"))
    rows.append((f"predict a folder of {p['images']} images, images/s", f"{p['ours_images_per_sec']:.1f}",
                 f"{p['seed_images_per_sec']:.1f}", f"{p['speedup_vs_seed']:.1f}x"))
    r = report["dvc_repro"]
    rows.append(("dvc repro, nothing changed, s", f"{r['seconds']:.2f}" if r["seconds"] is not None else "-", "",
                 r["note"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    where = report["device_name"] or cpu["name"]
    lines = [f"{report['device']} ({where}), batch {sz['batch_size']}, {sz['image_size']}x{sz['image_size']}, "
             f"{cpu['threads']} threads; CPU flags: {' '.join(cpu['flags'])}; bf16 native: {cpu['bf16_native']}; "
             f"training ex/s: best of {sz['train_iters']} steps, {sz['rounds']} round(s)"]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16", "fp16", "auto"],
                        help="also measure training at this precision (repeatable)")
    parser.add_argument("--compile", action="store_true", help="also measure the default with torch.compile")
    parser.add_argument("--project", type=Path, default=Path("."),
                        help="project whose params.yaml gives the training defaults and whose `dvc repro` "
                             "is timed (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"),
                        help="weights for the prediction throughput, if the file exists (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    require_d2l()
    from ssd.util.files import atomic_write_json
    from ssd.engine.inference import best_device

    report = run_bench(smoke=args.smoke, device=best_device(args.device), precisions=args.precision,
                       project=args.project, model=args.model, with_compile=args.compile,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(report))
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
