"""Benchmark the ``ssd`` package against the seed's own code, side by side in one run.

    pip install -e '.[bench]' && pip install --no-deps d2l==1.0.3
    python -m benchmarks.bench [--smoke] [--out reports/bench.json] [--device cpu|cuda]

The seed is the chapter's code (:mod:`benchmarks.seed`: the book's TinySSD, loss and ``predict`` on
the ``d2l`` package's ``multibox_prior``/``multibox_target``/``multibox_detection``). Measured, on
the benchmark's device (everything is built there; timers synchronize CUDA):

* training examples/sec of one step at batch 32, 256x256: the seed's (fp32, NCHW, ``float()``
  metrics) vs ours (``ssd.engine.loop.forward_loss`` + backward + SGD step with the training defaults:
  what ``train.precision`` and ``train.channels_last`` of params.yaml resolve to here, and the
  process setup of ``ssd train``). Each side runs in its own process, whose ``ru_maxrss`` is that
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
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import require_d2l

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("reports/bench.json")
FULL = {"batch_size": 32, "image_size": 256, "train_iters": 3, "iters": 5, "boxes": 10, "images": 64,
        "seed_images": 8, "rounds": 2}
SMOKE = {"batch_size": 4, "image_size": 64, "train_iters": 1, "iters": 1, "boxes": 10, "images": 4,
         "seed_images": 2, "rounds": 1}
# CPU features that decide which kernels run (bf16/fp16 natively or emulated).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


# ----------------------------------------------------------------------------------------------
# Inputs and timers

def random_labels(batch_size: int, boxes: int, generator: torch.Generator) -> torch.Tensor:
    """``Tensor[B, boxes, 5]`` of class-0 boxes, 10-40% of the image side, anywhere in it."""
    wh = 0.1 + 0.3 * torch.rand(batch_size, boxes, 2, generator=generator)
    xy = torch.rand(batch_size, boxes, 2, generator=generator) * (1 - wh)
    return torch.cat([torch.zeros(batch_size, boxes, 1), xy, xy + wh], dim=-1)


def realistic_scores(batch_size: int, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """Class probabilities ``Tensor[B, 2, A]`` like a trained detector's: 90% of anchors under the
    book's 0.01 floor, 9% between 0.01 and 0.3, 1% between 0.5 and 1."""
    u = torch.rand(batch_size, num_anchors, generator=generator)
    fg = torch.rand(batch_size, num_anchors, generator=generator)
    fg = torch.where(u < 0.90, fg * 0.0099, torch.where(u < 0.99, 0.01 + fg * 0.29, 0.5 + fg * 0.5))
    return torch.stack([1 - fg, fg], dim=1)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], iters: int, device: torch.device, warmup: int = 1) -> dict[str, float]:
    """Best and median wall seconds per call of ``fn`` over ``iters`` calls after ``warmup``, and the
    fewest CPU seconds (all threads of the process: what the call costs on a machine shared with
    other work, where wall time mostly measures the wait for a core)."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(iters):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"best_s": min(times), "median_s": statistics.median(times), "cpu_best_s": min(cpu)}


def timed_pair(ours: Callable[[], Any], seed: Callable[[], Any], iters: int, device: torch.device
               ) -> tuple[dict, dict]:
    """:func:`timed` for two functions, interleaved call by call."""
    ours(), seed()
    a: list[float] = []
    b: list[float] = []
    for _ in range(iters):
        for fn, times in ((ours, a), (seed, b)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return ({"best_s": min(a), "median_s": statistics.median(a)},
            {"best_s": min(b), "median_s": statistics.median(b)})


# ----------------------------------------------------------------------------------------------
# Training throughput, each side in a child process (so ru_maxrss is that run's own peak)

def training_defaults(project: Path) -> dict[str, Any]:
    """``train.precision`` and ``train.channels_last`` from ``project``'s params.yaml (the package's
    defaults, ``auto`` and ``true``, without one)."""
    import yaml

    path = project / "params.yaml"
    train = (yaml.safe_load(path.read_text()) or {}).get("train", {}) if path.is_file() else {}
    return {"precision": str(train.get("precision", "auto")), "channels_last": bool(train.get("channels_last", True))}


def train_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm-up + ``iters`` training steps; examples/sec and this process's peak RSS."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    B, S = spec["batch_size"], spec["image_size"]
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=gen).to(device)
    labels = random_labels(B, 1, gen).to(device)
    out: dict[str, Any] = {}
    if spec["impl"] == "seed":
        from . import seed as book

        net = book.TinySSD(num_classes=1).to(device)
        trainer = torch.optim.SGD(net.parameters(), lr=0.2, weight_decay=5e-4)
        metric = book.d2l.Accumulator(4)
        net.train()
        stats = timed(lambda: book.train_step(net, trainer, images.float(), labels, metric), spec["iters"], device)
        out["precision"], out["channels_last"] = "fp32", False
    else:
        stats, out = _time_ours(spec, device, images, labels)
    out.update({"examples_per_sec": B / stats["best_s"], "examples_per_sec_median": B / stats["median_s"],
                "examples_per_cpu_sec": B / stats["cpu_best_s"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads": torch.get_num_threads()})
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _time_ours(spec: dict[str, Any], device: torch.device, images: torch.Tensor, labels: torch.Tensor
               ) -> tuple[dict[str, float], dict[str, Any]]:
    """``ssd.engine.loop.train_one_epoch``'s step without the loader, after ``ssd train``'s process setup."""
    from ssd.engine.distributed import keep_freed_memory
    from ssd.core.model import TinySSD
    from ssd.engine.loop import AUTOCAST_DTYPES, forward_loss, resolve_precision

    kept = keep_freed_memory() if device.type == "cpu" else False  # as ssd.engine.distributed.init_distributed
    precision = resolve_precision(spec["precision"], device)
    channels_last = spec["channels_last"]
    model = TinySSD(1).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=5e-4)
    net = torch.compile(model) if spec.get("compile") else model
    net.train()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    first_bad = torch.full((), sys.maxsize, dtype=torch.int64, device=device)

    def step() -> None:
        nonlocal first_bad
        loss, step_stats = forward_loss(net, images, labels, autocast_dtype=AUTOCAST_DTYPES[precision],
                                        channels_last=channels_last)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        totals.add_(step_stats)
        first_bad = torch.where(torch.isfinite(loss.detach()), first_bad, 1)

    stats = timed(step, spec["iters"], device, warmup=2 if spec.get("compile") else 1)
    return stats, {"precision": precision, "channels_last": channels_last, "freed_memory_kept": kept,
                   "compile": bool(spec.get("compile"))}


def run_train_child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench", "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train(sizes: dict[str, Any], device: torch.device, configs: dict[str, dict[str, Any]],
                log: Callable[[str], None]) -> dict[str, Any]:
    """Seed and each of ``configs`` (name -> precision, channels_last, compile), alternating for
    ``sizes["rounds"]`` rounds; the best examples/sec and the largest peak RSS of each."""
    base = {"batch_size": sizes["batch_size"], "image_size": sizes["image_size"], "iters": sizes["train_iters"],
            "device": str(device)}
    specs = {"seed": {**base, "impl": "seed"}, **{name: {**base, "impl": "ours", **c} for name, c in configs.items()}}
    results: dict[str, dict[str, Any]] = {}
    for round_ in range(sizes["rounds"]):
        for name, spec in specs.items():
            log(f"training, round {round_ + 1}/{sizes['rounds']}: {name} ...")
            r = run_train_child(spec)
            best = results.get(name)
            if best is None or r["examples_per_sec"] > best["examples_per_sec"]:
                results[name] = {**r, "peak_rss_mb": max(r["peak_rss_mb"], (best or r)["peak_rss_mb"]),
                                 "examples_per_cpu_sec": max(r["examples_per_cpu_sec"],
                                                             (best or r)["examples_per_cpu_sec"])}
            else:
                best["peak_rss_mb"] = max(best["peak_rss_mb"], r["peak_rss_mb"])
                best["examples_per_cpu_sec"] = max(best["examples_per_cpu_sec"], r["examples_per_cpu_sec"])
    seed = results["seed"]
    for name in configs:
        r = results[name]
        r["speedup_vs_seed"] = r["examples_per_sec"] / seed["examples_per_sec"]
        r["cpu_speedup_vs_seed"] = r["examples_per_cpu_sec"] / seed["examples_per_cpu_sec"]
    return results


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
    import torchvision

    from ssd.core.model import TinySSD, load_model, save_model
    from ssd.engine.prediction import predict_files

    from . import seed as book

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

        seed_net = book.TinySSD(num_classes=1)
        seed_net.load_state_dict(load_model(weights).state_dict())  # the chapter's layer names are ours
        seed_net = seed_net.to(device)
        n = min(sizes["seed_images"], len(paths))

        def seed_run() -> None:
            with torch.no_grad():
                for path in paths[:n]:  # the chapter: read one image, predict, keep scores >= threshold
                    X = torchvision.io.read_image(str(path)).unsqueeze(0).float().to(device)
                    output = book.predict(seed_net, X)
                    [row for row in output if float(row[1]) >= 0.9]

        seed_s = timed(seed_run, 1, device, warmup=0)["best_s"]
    ours_ips, seed_ips = len(paths) / ours_s, n / seed_s
    return {"weights": str(model) if trained else "untrained (scores near 0.5 everywhere: a worst case for NMS)",
            "images": len(paths), "ours_images_per_sec": ours_ips, "seed_images_timed": n,
            "seed_images_per_sec": seed_ips, "speedup_vs_seed": ours_ips / seed_ips}


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
    from ssd.engine.loop import cpu_has_fast_bf16

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
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)  # one training run, internal
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    require_d2l()
    if args.child:
        print(json.dumps(train_child(json.loads(args.child))))
        return 0
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
