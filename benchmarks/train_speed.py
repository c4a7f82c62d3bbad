"""Training throughput, the seed's step against ours, each run in a child process of its own (so that
its ``ru_maxrss`` is that run's own peak memory): ``python -m benchmarks.train_speed SPEC`` runs one.

Ours is ``ssd.engine.step.train_step``, the training's own step, after ``ssd train``'s process setup.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .timing import random_labels, timed

ROOT = Path(__file__).resolve().parents[1]



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
    """``ssd train``'s step (``ssd.engine.step``) without the loader, after ``ssd train``'s process setup."""
    from ssd.core.model import TinySSD
    from ssd.engine.distributed import keep_freed_memory
    from ssd.engine.precision import AUTOCAST_DTYPES, resolve_precision
    from ssd.engine.step import Tally, train_step

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
    tally = Tally(device)

    def step() -> None:
        loss, step_stats = train_step(net, optimizer, scaler, images, labels,
                                      autocast_dtype=AUTOCAST_DTYPES[precision], channels_last=channels_last)
        tally.add(1, loss, step_stats)

    stats = timed(step, spec["iters"], device, warmup=2 if spec.get("compile") else 1)
    return stats, {"precision": precision, "channels_last": channels_last, "freed_memory_kept": kept,
                   "compile": bool(spec.get("compile"))}


def run_train_child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.train_speed", json.dumps(spec)]
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


if __name__ == "__main__":
    print(json.dumps(train_child(json.loads(sys.argv[1]))))
