"""Training checkpoints: what one holds, which one a run may resume from, and which ones stay.

A checkpoint (``epoch_NNNN.pt``, one per epoch, loadable with ``weights_only=True``) holds the
weights, optimizer, loss scaler and every RNG's state, the params it was made with (plain YAML
values), the history so far, and fingerprints of the training code and data. A run resumes from
the newest one that matches it in all of these but ``train.epochs``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import random
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssd.core.model import unwrap
from ssd.data.dataset import DetectionDataset, StreamDataset
from ssd.util.files import atomic_torch_save

CHECKPOINT_GLOB = "epoch_*.pt"
KEEP_CHECKPOINTS = 2
# The modules whose code decides what a checkpoint holds and how training continues from it.
CODE_MODULES = ("ssd.engine.loop", "ssd.engine.setup", "ssd.engine.step", "ssd.engine.precision",
                "ssd.engine.checkpoint", "ssd.core.model", "ssd.core.anchors", "ssd.core.boxes", "ssd.core.loss",
                "ssd.data.dataset", "ssd.data.images", "ssd.data.labels", "ssd.core.augment", "ssd.core.schedule",
                "ssd.core.anchor_fit", "ssd.core.fusion", "ssd.core.recipe", "ssd.engine.ema")


def resume_key(params: dict[str, Any]) -> dict[str, Any]:
    """The params (plain values, as recorded) a checkpoint must share with this run to be resumed:
    all but ``train.epochs``."""
    train = {k: v for k, v in (params.get("train") or {}).items() if k != "epochs"}
    return {"base": params.get("base"), "data": params.get("data"), "model": params.get("model"), "train": train}


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and lists (loadable with ``weights_only=True``).

    ``cuda`` holds the state of this process's own GPU only (``[]`` if it used none): every rank
    restores rank 0's, and a machine that sees fewer GPUs than the saving one can still resume.
    """
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    # Onto this process's current GPU; nothing to do for a process that runs on the CPU.
    if state.get("cuda") and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"][0])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch_{epoch:04d}.pt"


def save_checkpoint(directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, params: dict[str, Any], history: list[dict],
                    data_fingerprint: str, run_id: str, ema: Any = None) -> Path:
    """Write ``epoch_NNNN.pt`` atomically (older checkpoints stay: see ``prune_checkpoints``).

    ``params``: the run's params as plain values (``Settings.as_dict()``), compared by :func:`resume_key`;
    ``ema``: the recipe's weight average (``ssd.engine.ema.WeightAverage``), if any, saved as ``ema``.
    """
    net = unwrap(model)
    path = checkpoint_path(directory, epoch)
    atomic_torch_save({**({"ema": ema.state_dict()} if ema is not None else {}),
        "epoch": epoch, "sampler_epoch": epoch, "config": asdict(net.config), "model": net.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
        "params": params, "history": history, "data_fingerprint": data_fingerprint,
        "code_fingerprint": code_fingerprint(), "mlflow_run_id": run_id,
    }, path)
    return path


def prune_checkpoints(directory: Path, keep: Path, stale: list[Path]) -> None:
    """Delete an earlier run's checkpoints (``stale``) and all but the newest KEEP_CHECKPOINTS."""
    for old in stale:
        if old != keep:
            old.unlink(missing_ok=True)
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)


def find_checkpoint(directory: Path, params: dict[str, Any], data_fingerprint: str,
                    epochs: int) -> dict[str, Any] | None:
    """The newest readable checkpoint made with matching params, code and data, at most at epoch
    ``epochs``, else None (with a warning saying why)."""
    for path in sorted(directory.glob(CHECKPOINT_GLOB), reverse=True):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a foreign or damaged file: try the one before it
            warnings.warn(f"{path}: unreadable checkpoint ({exc}); trying an older one", stacklevel=2)
            continue
        mismatch = _mismatch(ckpt, params, data_fingerprint, epochs)
        if mismatch:
            warnings.warn(f"{path} {mismatch}; starting fresh", stacklevel=2)
            return None
        ckpt["path"] = str(path)
        return ckpt
    return None


def _mismatch(ckpt: dict[str, Any], params: dict[str, Any], data_fingerprint: str, epochs: int) -> str | None:
    """Why this run cannot continue from ``ckpt``, or None."""
    if resume_key(ckpt.get("params", {})) != resume_key(params):
        return "was made with different params"
    if ckpt.get("code_fingerprint") != code_fingerprint():
        return "was made by different training code"
    if ckpt.get("data_fingerprint") != data_fingerprint:
        return "was made on different training data"
    if ckpt["epoch"] > epochs:
        return f"is at epoch {ckpt['epoch']}, past train.epochs={epochs}"
    return None


def code_fingerprint() -> str:
    """SHA-1 of the training code: a checkpoint is only resumed by the code that made it."""
    digest = hashlib.sha1()
    for name in CODE_MODULES:
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()


def data_fingerprint(dataset: DetectionDataset | StreamDataset) -> str:
    """Cheap identity of the training data: names, labels, image size (images follow from the fetch)."""
    return dataset.fingerprint()
