"""Benchmark this package against the seed's own implementation, side by side in one run.

    ssd bench [--smoke] [--out reports/bench.json]

The seed is the book's chapter code on top of the ``d2l`` package: its TinySSD (the same layers,
but anchors from ``d2l.multibox_prior`` on every forward), ``d2l.multibox_target``, its
``calc_loss`` and metrics (Python floats, so a host sync per step), fp32, NCHW. Measured:

* training throughput (examples/s) for each precision, ours and the seed's; each configuration
  runs in its own subprocess, whose ``ru_maxrss`` is the peak memory of that training run;
* ``multibox_detection`` on a batch with realistic scores (mostly low, a few high), and the
  end-to-end predict latency of one image (forward + softmax + detection);
* ``multibox_target`` on images with 10 boxes each;
* ``dvc repro`` with nothing changed, in ``--project`` if its pipeline is up to date.

Every figure is measured; ratios are ours over the seed's (speed) and the seed's over ours (time).
``--smoke`` shrinks everything (batch 4, 64x64, one timed iteration) so it runs in seconds.
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
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .files import atomic_write_json
from .model import SEED_RATIOS, SEED_SIZES, TinySSD, bbox_predictor, cls_predictor, concat_preds, get_blk

DEFAULT_OUT = Path("reports/bench.json")
FULL = {"batch_size": 32, "image_size": 256, "train_iters": 3, "iters": 5, "boxes": 10}
SMOKE = {"batch_size": 4, "image_size": 64, "train_iters": 1, "iters": 1, "boxes": 10}


# ----------------------------------------------------------------------------------------------
# The seed: the chapter's code, as printed in the book, on the d2l package's functions.

class SeedTinySSD(nn.Module):
    """The chapter's TinySSD: anchors are rebuilt with ``d2l.multibox_prior`` on every call."""

    def __init__(self, num_classes: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        num_anchors = len(SEED_SIZES[0]) + len(SEED_RATIOS) - 1
        for i, channels in enumerate([64, 128, 128, 128, 128]):
            setattr(self, f"blk_{i}", get_blk(i))
            setattr(self, f"cls_{i}", cls_predictor(channels, num_anchors, num_classes))
            setattr(self, f"bbox_{i}", bbox_predictor(channels, num_anchors))

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import d2l.torch as d2l

        anchors, cls_preds, bbox_preds = [None] * 5, [None] * 5, [None] * 5
        for i in range(5):
            X = getattr(self, f"blk_{i}")(X)
            anchors[i] = d2l.multibox_prior(X, sizes=SEED_SIZES[i], ratios=SEED_RATIOS)
            cls_preds[i] = getattr(self, f"cls_{i}")(X)
            bbox_preds[i] = getattr(self, f"bbox_{i}")(X)
        cls = concat_preds(cls_preds)
        return (torch.cat(anchors, dim=1), cls.reshape(cls.shape[0], -1, self.num_classes + 1),
                concat_preds(bbox_preds))


def seed_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks):  # the chapter's
    batch_size, num_classes = cls_preds.shape[0], cls_preds.shape[2]
    cls = nn.CrossEntropyLoss(reduction="none")(cls_preds.reshape(-1, num_classes), cls_labels.reshape(-1))
    cls = cls.reshape(batch_size, -1).mean(dim=1)
    bbox = nn.L1Loss(reduction="none")(bbox_preds * bbox_masks, bbox_labels * bbox_masks).mean(dim=1)
    return cls + bbox


def seed_train_step(net: nn.Module, trainer: torch.optim.Optimizer, X: torch.Tensor, Y: torch.Tensor) -> list[float]:
    """One step of the chapter's loop, its metric updates (``float(...)``: host syncs) included."""
    import d2l.torch as d2l

    trainer.zero_grad()
    anchors, cls_preds, bbox_preds = net(X)
    bbox_labels, bbox_masks, cls_labels = d2l.multibox_target(anchors, Y)
    loss = seed_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    loss.mean().backward()
    trainer.step()
    return [float((cls_preds.argmax(dim=-1).type(cls_labels.dtype) == cls_labels).sum()), cls_labels.numel(),
            float(torch.abs((bbox_labels - bbox_preds) * bbox_masks).sum()), bbox_labels.numel()]


def seed_predict(net: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The chapter's ``predict``: kept rows of the first image."""
    import d2l.torch as d2l
    import torch.nn.functional as F

    net.eval()
    anchors, cls_preds, bbox_preds = net(X)
    cls_probs = F.softmax(cls_preds, dim=2).permute(0, 2, 1)
    output = d2l.multibox_detection(cls_probs, bbox_preds, anchors)
    idx = [i for i, row in enumerate(output[0]) if row[0] != -1]
    return output[0, idx]


# ----------------------------------------------------------------------------------------------
# Inputs

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


def timed(fn: Callable[[], Any], iters: int, warmup: int = 1) -> dict[str, float]:
    """Best and median seconds per call of ``fn`` over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times)}


def timed_pair(ours: Callable[[], Any], seed: Callable[[], Any], iters: int) -> tuple[dict, dict]:
    """:func:`timed` for two functions, interleaved, so a burst of load on a shared machine hits
    both sides alike and the ratio stays meaningful."""
    ours(), seed()
    a, b = [], []
    for _ in range(iters):
        for fn, times in ((ours, a), (seed, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return ({"best_s": min(a), "median_s": statistics.median(a)},
            {"best_s": min(b), "median_s": statistics.median(b)})


# ----------------------------------------------------------------------------------------------
# Training throughput (in a child process, so ru_maxrss is that run's own peak)

def train_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run warm-up + ``iters`` training steps; returns examples/s and the process's peak RSS."""
    from .train import AUTOCAST_DTYPES, forward_loss, resolve_precision

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    B, S = spec["batch_size"], spec["image_size"]
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=gen)
    labels = random_labels(B, 1, gen)
    out: dict[str, Any] = {}
    if spec["impl"] == "seed":
        net = SeedTinySSD(1)
        trainer = torch.optim.SGD(net.parameters(), lr=0.2, weight_decay=5e-4)
        net.train()
        stats = timed(lambda: seed_train_step(net, trainer, images.float(), labels), spec["iters"])
        out["precision"] = "fp32"
    else:
        precision = resolve_precision(spec["precision"], torch.device("cpu"))
        model = TinySSD(1)
        if spec["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=5e-4)
        net = torch.compile(model) if spec.get("compile") else model
        net.train()
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
        totals = torch.zeros(6, dtype=torch.float64)

        def step() -> None:  # train.train_one_epoch's step, without the loader
            loss, step_stats = forward_loss(net, images, labels, autocast_dtype=AUTOCAST_DTYPES[precision],
                                            channels_last=spec["channels_last"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            totals.add_(step_stats)

        stats = timed(step, spec["iters"], warmup=2 if spec.get("compile") else 1)
        out["precision"] = precision
    out.update({"examples_per_sec": B / stats["best_s"], "examples_per_sec_median": B / stats["median_s"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "threads": torch.get_num_threads()})
    return out


# glibc returns every freed tensor over 32 MB to the kernel, so each step page-faults its
# activations in afresh (about a quarter of a step's CPU time here, all of it system time);
# these variables keep freed memory in the process instead, at the cost of a larger RSS.
MALLOC_KEEP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def run_train_child(spec: dict[str, Any], timeout: float = 1800, env: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ssd.bench", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# In-process measurements

def bench_detection(sizes: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    import d2l.torch as d2l

    from .anchors import multibox_detection

    B = sizes["batch_size"]
    with torch.no_grad():
        anchors = TinySSD(1)(torch.zeros(1, 3, sizes["image_size"], sizes["image_size"]))[0]
    A = anchors.shape[1]
    probs = realistic_scores(B, A, gen)
    offsets = 0.1 * torch.randn(B, A * 4, generator=gen)
    ours = timed(lambda: multibox_detection(probs, offsets, anchors), sizes["iters"])
    # The book loops over images and its NMS walks all A anchors, low scores included (seconds per
    # image here), so it is timed once on the first few images: its cost per image is the same.
    n = min(B, 4)
    seed = timed(lambda: d2l.multibox_detection(probs[:n], offsets[:n], anchors), 1, warmup=0)
    return {"batch_size": B, "anchors": A, "ours_ms_per_image": 1e3 * ours["best_s"] / B,
            "seed_ms_per_image": 1e3 * seed["best_s"] / n, "seed_images_timed": n,
            "above_floor_per_image": float((probs[:, 1] >= 0.01).sum()) / B}


def bench_target(sizes: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    import d2l.torch as d2l

    from .anchors import multibox_target

    with torch.no_grad():
        anchors = TinySSD(1)(torch.zeros(1, 3, sizes["image_size"], sizes["image_size"]))[0]
    labels = random_labels(sizes["batch_size"], sizes["boxes"], gen)
    ours, seed = timed_pair(lambda: multibox_target(anchors, labels), lambda: d2l.multibox_target(anchors, labels),
                            sizes["iters"])
    return {"batch_size": sizes["batch_size"], "boxes": sizes["boxes"], "ours_ms": 1e3 * ours["best_s"],
            "seed_ms": 1e3 * seed["best_s"]}


def bench_predict(sizes: dict[str, Any], gen: torch.Generator, model: Path | None) -> dict[str, Any]:
    """One image, end to end (forward, softmax, detection), with the same weights on both sides."""
    from .model import load_model
    from .predict import detect_raw

    trained = model is not None and model.is_file()
    net = load_model(model) if trained else TinySSD(1).eval()
    seed_net = SeedTinySSD(net.num_classes)
    seed_net.load_state_dict(net.state_dict())  # the chapter's layer names are ours
    S = sizes["image_size"]
    image = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        ours, seed = timed_pair(lambda: detect_raw(net, image), lambda: seed_predict(seed_net, image.float()),
                                sizes["iters"])
    return {"weights": str(model) if trained else "untrained (scores near 0.5 everywhere: a worst case for NMS)",
            "ours_ms": 1e3 * ours["best_s"], "seed_ms": 1e3 * seed["best_s"]}


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
# The command

def run_bench(*, smoke: bool = False, precisions: list[str] | None = None, project: Path = Path("."),
              model: Path | None = None, with_compile: bool = False, log=print) -> dict[str, Any]:
    """Every measurement; returns the JSON-ready report."""
    sizes = dict(SMOKE if smoke else FULL)
    # Smoke runs measure the default only: each configuration is a fresh process (seconds to start).
    precisions = precisions or (["auto"] if smoke else ["fp32", "bf16", "auto"])
    base = {"batch_size": sizes["batch_size"], "image_size": sizes["image_size"], "iters": sizes["train_iters"]}
    report: dict[str, Any] = {"smoke": smoke, "sizes": sizes, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "cpu": _cpu_name(),
                              "bf16_native": _bf16_native(), "mkldnn_fp16": _mkldnn_fp16()}
    log("training: the seed's step ...")
    seed = run_train_child({**base, "impl": "seed"})
    train: dict[str, Any] = {"seed": seed}
    configs = [(p, "", False) for p in precisions] + [("auto", "+compile", True)] * with_compile
    configs += [] if smoke else [("auto", "+malloc-keep", False)]
    for precision, suffix, compiled in configs:
        name = precision + suffix
        log(f"training: ours, {name} ...")
        result = run_train_child({**base, "impl": "ours", "precision": precision, "channels_last": True,
                                  "compile": compiled}, env=MALLOC_KEEP_ENV if "malloc" in suffix else None)
        result["speedup_vs_seed"] = result["examples_per_sec"] / seed["examples_per_sec"]
        train[name] = result
    report["train"] = train
    gen = torch.Generator().manual_seed(0)
    log("multibox_detection ...")
    report["detection"] = det = bench_detection(sizes, gen)
    det["speedup_vs_seed"] = det["seed_ms_per_image"] / det["ours_ms_per_image"]
    log("multibox_target ...")
    report["target"] = tgt = bench_target(sizes, gen)
    tgt["speedup_vs_seed"] = tgt["seed_ms"] / tgt["ours_ms"]
    log("predict ...")
    report["predict"] = pred = bench_predict(sizes, gen, model)
    pred["speedup_vs_seed"] = pred["seed_ms"] / pred["ours_ms"]
    log("dvc repro ...")
    report["dvc_repro"] = bench_dvc_repro(project)
    return report


def format_table(report: dict[str, Any]) -> str:
    sz = report["sizes"]
    rows = [("measurement", "ours", "seed (d2l)", "ratio")]
    seed = report["train"]["seed"]
    for name, r in report["train"].items():
        if name == "seed":
            continue
        label = f"train {name}" + (f" (= {r['precision']})" if name.startswith("auto") else "")
        rows.append((f"{label}, ex/s", f"{r['examples_per_sec']:.1f}", f"{seed['examples_per_sec']:.1f}",
                     f"{r['speedup_vs_seed']:.2f}x"))
    for name, r in report["train"].items():
        if name != "seed":
            rows.append((f"train peak RSS {name}, MB", f"{r['peak_rss_mb']:.0f}", f"{seed['peak_rss_mb']:.0f}",
                          f"{r['peak_rss_mb'] / seed['peak_rss_mb']:.2f}x"))
    d, t, p = report["detection"], report["target"], report["predict"]
    rows.append((f"multibox_detection, ms/image (B={d['batch_size']})", f"{d['ours_ms_per_image']:.2f}",
                 f"{d['seed_ms_per_image']:.2f}", f"{d['speedup_vs_seed']:.1f}x"))
    rows.append((f"multibox_target, ms ({t['batch_size']}x{t['boxes']} boxes)", f"{t['ours_ms']:.2f}",
                 f"{t['seed_ms']:.2f}", f"{t['speedup_vs_seed']:.1f}x"))
    rows.append(("predict 1 image end to end, ms", f"{p['ours_ms']:.1f}", f"{p['seed_ms']:.1f}",
                 f"{p['speedup_vs_seed']:.1f}x"))
    r = report["dvc_repro"]
    rows.append(("dvc repro, nothing changed, s", f"{r['seconds']:.2f}" if r["seconds"] is not None else "-", "",
                 r["note"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"batch {sz['batch_size']}, {sz['image_size']}x{sz['image_size']}, {report['threads']} threads, "
             f"{report['cpu']}; training ex/s are the best of {sz['train_iters']} steps"]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _bf16_native() -> bool:
    from .train import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def _mkldnn_fp16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return bool(check()) if check is not None else False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (default: %(default)s)")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16", "fp16", "auto"],
                        help="training precisions to measure (repeatable; default fp32, bf16, auto)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (auto precision)")
    parser.add_argument("--project", type=Path, default=Path("."),
                        help="project whose `dvc repro` is timed (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"),
                        help="weights for the predict latency, if the file exists (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    report = run_bench(smoke=args.smoke, precisions=args.precision, project=args.project, model=args.model,
                       with_compile=args.compile, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(report))
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # the training child: python -m ssd.bench --child '{json spec}'
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(train_child(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m ssd.bench --child SPEC (use `ssd bench` instead)")
