"""Benchmark inputs and timers: random boxes and scores, and wall/CPU timers that wait for the device."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


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
