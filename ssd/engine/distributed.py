"""Process-group plumbing for training under ``python`` or ``torchrun``; nothing about the model.

Under ``torchrun`` the environment holds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without it the
process is rank 0 of 1 and no process group is made, so callers never branch on the launch mode:
``get_rank``/``get_world_size`` answer 0/1 and the reductions return their input.
Backend: NCCL when the process drives a GPU, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(local_rank: int = 0) -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is visible (one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                               f"use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """The process-group backend for a process driving ``device``: NCCL on a GPU, gloo on a CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel (glibc only).

    A training step on the CPU allocates and frees the same large activations every time. glibc
    serves every block over 32 MB with a fresh ``mmap`` and unmaps it on free, so each step
    page-faults its activations in again (a quarter of a step's CPU time, all of it system time).
    This is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment would do, set
    from inside: freed blocks stay in the heap for the next step, at the price of a higher
    resident size (the peak of one step stays resident). Returns whether the settings took.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    A training process on the CPU also keeps its freed memory (:func:`keep_freed_memory`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(local_rank)
    if device.type == "cpu":
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        backend = backend_for(device)
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout, **_attempt_store(rank, world_size, timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dict[str, Any]:
    """Under torchrun, the group's store with a per-attempt key prefix.

    torchrun keeps its store across ``--max-restarts`` restarts; without a fresh prefix a
    restarted rank can read the previous attempt's (dead) peer addresses and fail to connect.
    Elsewhere ``{}``: ``init_process_group`` reads MASTER_ADDR/MASTER_PORT itself.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_store, timeout=timeout)
    return {"store": dist.PrefixStore(f"ssd/attempt_{attempt}", store), "rank": rank, "world_size": world_size}


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (in place, also returned)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``tensor`` over all ranks (in place, also returned)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small things such as a checkpoint dict)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()
