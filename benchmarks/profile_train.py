"""Where a training step's time goes, and how far it is from this CPU's arithmetic peak.

    python -m benchmarks.profile_train [--steps 3] [--batch-size 32] [--image-size 256] [--precision auto] [--fp32-nchw]

Runs ``ssd train``'s step (``ssd.engine.step.train_step``, the training defaults, the process setup
of ``ssd train``) under ``torch.profiler`` and prints: time per op family (convolution, batch norm,
ReLU, pooling, the rest), the convolutions' FLOPs (forward and backward, counted by
``torch.utils.flop_counter``) and the rate they ran at, a large matmul's rate on this machine in the
step's precision (the practical peak: fp32, or bf16 where the step runs in bf16), and the lower bound
on a step's time that the FLOPs set at that peak. User and system CPU time per step come from
``os.times``.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from typing import Any, Callable

import torch

FAMILIES = (("convolution", ("conv", "mkldnn_convolution")), ("batch_norm", ("batch_norm",)),
            ("relu", ("relu", "threshold", "clamp_min")), ("max_pool", ("max_pool", "amax")),
            ("loss_and_targets", ("cross_entropy", "nll_loss", "log_softmax", "l1", "abs", "topk", "gather")))


def matmul_gflops(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """GFLOP/s of an ``n x n`` matmul in ``dtype``, best of ``reps``: per wall second (the practical
    peak of this CPU when nothing else runs) and per CPU-second of all threads (per core, whatever
    the load)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    wall = cpu = float("inf")
    for _ in range(reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - cpu_start)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a zero step count or size divides by zero)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_train", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--image-size", type=positive_int, default=256)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="train.precision of the step (default: %(default)s, as params.yaml)")
    parser.add_argument("--fp32-nchw", action="store_true", help="plain fp32 NCHW instead of the defaults")
    parser.add_argument("--matmul-size", type=positive_int, default=2048, help="side of the peak-rate matmul")
    parser.add_argument("--no-keep-memory", action="store_true", help="leave glibc's malloc settings alone")
    return parser


def training_step(batch_size: int, image_size: int, precision: str, channels_last: bool) -> Callable[[], None]:
    """``ssd train``'s step on a fixed random batch, as a closure (``precision`` already resolved)."""
    from ssd.core.model import TinySSD
    from ssd.engine.precision import AUTOCAST_DTYPES
    from ssd.engine.step import train_step

    torch.manual_seed(0)
    B, S = batch_size, image_size
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8)
    corner = torch.rand(B, 2) * 0.5
    labels = torch.cat([torch.zeros(B, 1), corner, corner + 0.3], dim=1)[:, None]
    model = TinySSD(1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    model.train()
    return lambda: train_step(model, optimizer, scaler, images, labels, autocast_dtype=AUTOCAST_DTYPES[precision],
                              channels_last=channels_last)


def measure(step: Callable[[], None], steps: int) -> dict[str, Any]:
    """Per step: wall, user and system seconds; self CPU microseconds per op family and of the
    largest other ops (over ``steps``); the convolutions' FLOPs, forward and backward."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    step()  # warm-up
    t0, w0 = os.times(), time.perf_counter()
    for _ in range(steps):
        step()
    t1, wall = os.times(), (time.perf_counter() - w0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    # The profiler's own FLOP count sees autocast's extra conv2d call and counts it twice; the
    # dispatch-level counter sees each convolution and its backward once.
    with FlopCounterMode(display=False) as counter:
        step()
    by_family: dict[str, float] = defaultdict(float)
    # Self time per op, grouped: sums to the step's time without double counting.
    for evt in prof.key_averages():
        by_family[family(evt.key)] += evt.self_cpu_time_total
    others = sorted(((e.self_cpu_time_total, e.key) for e in prof.key_averages() if family(e.key) == "other"),
                    reverse=True)[:6]
    return {"wall": wall, "user": (t1.user - t0.user) / steps, "system": (t1.system - t0.system) / steps,
            "by_family": dict(by_family), "others": others,
            "conv_flops": sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))}


def report(m: dict[str, Any], args: argparse.Namespace, precision: str, channels_last: bool, kept: bool) -> None:
    """Print :func:`measure`'s figures against this CPU's matmul rate in the step's precision."""
    from ssd.engine.precision import AUTOCAST_DTYPES

    B, S, n, threads = args.batch_size, args.image_size, args.matmul_size, torch.get_num_threads()
    wall, user, system, by_family, flops = m["wall"], m["user"], m["system"], m["by_family"], m["conv_flops"]
    self_total = sum(by_family.values())
    print(f"{precision}, {'channels_last' if channels_last else 'NCHW'}, batch {B}, {S}x{S}, "
          f"{threads} threads, freed memory kept: {kept}")
    print(f"step: {wall:.2f} s wall = {B / wall:.1f} examples/s; CPU per step: user {user:.2f} s, "
          f"system {system:.2f} s = {(user + system) / B:.3f} CPU-s/example")
    for fam, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:<18} {100 * us / self_total:5.1f}%")
    print("  other, largest: " + ", ".join(f"{k} {100 * us / self_total:.1f}%" for us, k in m["others"]))
    conv_s = by_family.get("convolution", 0.0) / 1e6 / args.steps
    print(f"convolutions: {flops / B / 1e9:.4g} GFLOP/example forward + backward; they ran at "
          f"{flops / conv_s / 1e9:.0f} GFLOP/s ({100 * by_family.get('convolution', 0.0) / self_total:.0f}% of the step)")
    peak_dtype = AUTOCAST_DTYPES[precision] or torch.float32
    peak, per_core = matmul_gflops(n, dtype=peak_dtype)
    print(f"{str(peak_dtype).removeprefix('torch.')} matmul {n}x{n}: {peak:.0f} GFLOP/s wall, {per_core:.0f} GFLOP "
          f"per CPU-second (x {threads} threads = {per_core * threads:.0f} GFLOP/s on free cores)")
    floor = flops / B / (per_core * 1e9)
    print(f"floor from the FLOPs alone at that rate: {floor:.3f} CPU-s/example "
          f"= {threads / floor:.1f} examples/s at most on free cores")


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    from ssd.engine.distributed import keep_freed_memory
    from ssd.engine.precision import resolve_precision

    kept = False if args.no_keep_memory else keep_freed_memory()
    precision = "fp32" if args.fp32_nchw else resolve_precision(args.precision, torch.device("cpu"))
    channels_last = not args.fp32_nchw
    step = training_step(args.batch_size, args.image_size, precision, channels_last)
    report(measure(step, args.steps), args, precision, channels_last, kept)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
