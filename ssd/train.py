"""Train TinySSD with the seed's recipe; the same code runs alone or under ``torchrun``.

    ssd train                                                   # one process (CPU or one GPU)
    torchrun --standalone --nproc-per-node 4 -m ssd train       # 4 processes on this machine
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint host:29400 -m ssd train

``train.batch_size`` is the GLOBAL batch: each of N processes takes ``batch_size / N``, so the
recipe (SGD, lr 0.2, weight decay 5e-4, batch 32) is unchanged by the process count. Only rank 0
writes files and talks to MLflow. Every epoch ends with a checkpoint in ``models/checkpoints/``; a
rerun resumes from the newest one whose params match (all of base/data/model/train but
``train.epochs``), so ``dvc repro`` after a crash, or ``torchrun --max-restarts``, continue where
the run stopped.

Test-only fault injection: ``SSD_FAULT=nan@E:S`` makes the loss of epoch E (1-based), step S
(1-based) NaN; ``SSD_FAULT=kill@E:S[:RANK]`` SIGKILLs the process there (every rank, or RANK only).
Faults fire only in a first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a
``torchrun --max-restarts`` restart runs clean.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .anchors import multibox_target
from .augment import epoch_generator, ssd_augment
from .boxes import check_boxes
from .data import DetectionDataset, load_dataset, make_loader
from .files import atomic_save_figure, atomic_torch_save, atomic_write_json, atomic_write_text
from .loss import bbox_eval, calc_loss, cls_eval
from .model import TinySSD, save_model, unwrap
from .schedule import lr_factor, make_scheduler

DEFAULT_DATA = Path("data/raw/banana-detection")
HISTORY_COLUMNS = ["epoch", "loss", "class_err", "bbox_mae", "examples_per_sec"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_GLOB = "epoch_*.pt"
KEEP_CHECKPOINTS = 2
CHECK_EVERY = 10  # steps between (collective) checks for a non-finite loss


# ----------------------------------------------------------------------------------------------
# Settings

def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``requested`` (one of PRECISIONS) on ``device``.

    ``auto``: on a GPU, bf16 autocast where the GPU has it, else fp16 with loss scaling; on a CPU,
    bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or AMX), else fp32, since
    emulated bf16 is slower than fp32.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision={requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in
                 ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return bool(native and torch.backends.mkldnn.is_available())


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resume_key(params: dict[str, Any]) -> dict[str, Any]:
    """The params a checkpoint must share with this run to be resumed: all but ``train.epochs``."""
    train = {k: v for k, v in (params.get("train") or {}).items() if k != "epochs"}
    return {"base": params.get("base"), "data": params.get("data"), "model": params.get("model"), "train": train}


# ----------------------------------------------------------------------------------------------
# Test-only fault injection (see the module docstring); read in this one place.

@dataclass(frozen=True)
class Fault:
    kind: str
    epoch: int
    step: int
    rank: int | None = None

    def fire(self, epoch: int, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        if (epoch, step) != (self.epoch, self.step) or self.rank not in (None, rank):
            return loss
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return loss * float("nan")


def parse_fault(spec: str | None) -> Fault | None:
    """``"nan@2:1"`` -> ``Fault("nan", 2, 1)``; ``"kill@2:1:1"`` kills rank 1 only."""
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    kind, _, where = spec.partition("@")
    parts = where.split(":")
    if kind not in ("nan", "kill") or len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(f"SSD_FAULT={spec!r}: expected nan@EPOCH:STEP or kill@EPOCH:STEP[:RANK]")
    return Fault(kind, int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else None)


# ----------------------------------------------------------------------------------------------
# The loop

def forward_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's training loss and metric sums for one batch.

    Args:
        images: ``uint8 Tensor[B, 3, S, S]``; labels: ``Tensor[B, M, 5]`` (already checked, so
            ``multibox_target`` skips its per-batch host sync).

    Returns:
        ``loss`` (0-dim, mean over the batch) and ``float64 Tensor[6]``: summed per-example loss,
        examples, correctly classified anchors, anchors, summed abs bbox error, bbox label count.
    """
    X = images.float()
    if channels_last:
        X = X.contiguous(memory_format=torch.channels_last)
    autocast = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    with autocast:
        anchors, cls_preds, bbox_preds = model(X)
    bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, labels, check=False)
    per_example = calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    with torch.no_grad():
        stats = torch.stack([
            per_example.detach().sum().double(),
            torch.tensor(float(len(images)), dtype=torch.float64, device=images.device),
            cls_eval(cls_preds, cls_labels).double(),
            torch.tensor(float(cls_labels.numel()), dtype=torch.float64, device=images.device),
            bbox_eval(bbox_preds, bbox_labels, bbox_masks).double(),
            torch.tensor(float(bbox_labels.numel()), dtype=torch.float64, device=images.device),
        ])
    return per_example.mean(), stats


def _raise_if_nonfinite(first_bad: torch.Tensor, epoch: int, last_good: str) -> None:
    """Collective: every rank learns the first bad step, so all stop together."""
    bad = int(dist.all_reduce_min(first_bad.clone()).item())
    if bad < sys.maxsize:
        raise RuntimeError(f"non-finite loss at epoch {epoch} step {bad}: training stopped; "
                           f"last good checkpoint: {last_good}")


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, epoch: int, device: torch.device,
                    autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                    fault: Fault | None = None, progress: bool = False, last_good: str = "none",
                    desc: str = "", augment: Callable | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict[str, float]:
    """One pass over the loader; returns the epoch's metrics reduced over all ranks.

    ``augment(images, labels) -> (images, labels)`` transforms each batch on the device;
    ``scheduler`` steps after every optimizer step (see ``ssd.schedule``).
    """
    from tqdm import tqdm

    model.train()
    loader.sampler.set_epoch(epoch)
    rank = dist.get_rank()
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    first_bad = torch.full((), sys.maxsize, dtype=torch.int64, device=device)
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=1.0, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar, start=1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if augment is not None:
            images, labels = augment(images, labels)
        loss, stats = forward_loss(model, images, labels, autocast_dtype=autocast_dtype, channels_last=channels_last)
        if fault is not None:
            loss = fault.fire(epoch, step, rank, loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        totals += stats
        # Recorded on the device, read every CHECK_EVERY steps: no host sync per step.
        first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad < sys.maxsize), first_bad, step)
        if step % CHECK_EVERY == 0:
            _raise_if_nonfinite(first_bad, epoch, last_good)
            if progress:
                bar.set_postfix(loss=f"{(totals[0] / totals[1]).item():.3g}")
    _raise_if_nonfinite(first_bad, epoch, last_good)
    loss_sum, n, correct, anchors, abs_err, bbox_n = dist.all_reduce_sum(totals).tolist()
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / n, "class_err": 1 - correct / anchors, "bbox_mae": abs_err / bbox_n,
            "examples_per_sec": n / elapsed}


# ----------------------------------------------------------------------------------------------
# Checkpoints

def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and lists (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch_{epoch:04d}.pt"


def save_checkpoint(directory: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, params: dict[str, Any], history: list[dict],
                    data_fingerprint: str, run_id: str) -> Path:
    """Write ``epoch_NNNN.pt`` atomically and keep the newest KEEP_CHECKPOINTS."""
    net = unwrap(model)
    path = checkpoint_path(directory, epoch)
    atomic_torch_save({
        "epoch": epoch, "sampler_epoch": epoch, "config": asdict(net.config), "model": net.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
        "params": params, "history": history, "data_fingerprint": data_fingerprint,
        "code_fingerprint": code_fingerprint(), "mlflow_run_id": run_id,
    }, path)
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def find_checkpoint(directory: Path, params: dict[str, Any], data_fingerprint: str) -> dict[str, Any] | None:
    """The newest readable checkpoint made with matching params and data, else None (with a warning)."""
    for path in sorted(directory.glob(CHECKPOINT_GLOB), reverse=True):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a foreign or damaged file: try the one before it
            warnings.warn(f"{path}: unreadable checkpoint ({exc}); trying an older one", stacklevel=2)
            continue
        if resume_key(ckpt.get("params", {})) != resume_key(params):
            warnings.warn(f"{path} was made with different params; starting fresh", stacklevel=2)
            return None
        if ckpt.get("code_fingerprint") != code_fingerprint():
            warnings.warn(f"{path} was made by different training code; starting fresh", stacklevel=2)
            return None
        if ckpt.get("data_fingerprint") != data_fingerprint:
            warnings.warn(f"{path} was made on different training data; starting fresh", stacklevel=2)
            return None
        if ckpt["epoch"] > params["train"]["epochs"]:
            warnings.warn(f"{path} is at epoch {ckpt['epoch']}, past train.epochs={params['train']['epochs']}; "
                          f"starting fresh", stacklevel=2)
            return None
        ckpt["path"] = str(path)
        return ckpt
    return None


CODE_MODULES = ("train", "model", "anchors", "boxes", "loss", "data", "augment", "schedule")


def code_fingerprint() -> str:
    """SHA-1 of the training code: a checkpoint is only resumed by the code that made it."""
    digest = hashlib.sha1()
    for name in CODE_MODULES:
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()


def data_fingerprint(dataset: DetectionDataset) -> str:
    """Cheap identity of the training data: names and labels (images follow from the fetch)."""
    digest = hashlib.sha1()
    digest.update("\n".join(dataset.names).encode())
    digest.update(dataset.labels.numpy().tobytes())
    digest.update(str(tuple(dataset.images.shape)).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reports

def history_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def curve_figure(history: list[dict[str, float]], epochs: int):
    """The seed's training picture: class error and bbox MAE per epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot()
    x = [h["epoch"] for h in history]
    ax.plot(x, [h["class_err"] for h in history], label="class error")
    ax.plot(x, [h["bbox_mae"] for h in history], "m--", label="bbox mae")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs, 2))
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    return fig


class Tracker:
    """The pipeline's MLflow run, on rank 0 only (every method is a no-op elsewhere)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.run_id = ""

    def start(self, *, uri: str, experiment: str, run_id: str | None, run_name: str, params: dict[str, Any],
              tags: dict[str, str], data: Path, run_file: Path) -> None:
        if not self.active:
            return
        import mlflow

        from .tracking import flatten_params, log_dataset_inputs, start_or_resume_run, write_run_file

        run, resumed = start_or_resume_run(uri, experiment, run_id, run_name)
        self.run_id = run.info.run_id
        if not resumed:  # params are immutable in MLflow; a resumed run already has them
            mlflow.log_params(flatten_params(params))
        mlflow.set_tags(tags)
        log_dataset_inputs(data)  # the same name and digest again on a resume: MLflow keeps one
        write_run_file(self.run_id, uri, run_file, experiment=experiment)

    def log_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Path) -> None:
        if not self.active:
            return
        import shutil
        import tempfile

        import mlflow

        mlflow.log_metrics(metrics, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:  # one artifact, always the latest checkpoint
            shutil.copy(checkpoint, Path(tmp) / "last.pt")
            mlflow.log_artifact(str(Path(tmp) / "last.pt"), artifact_path="checkpoints")
        mlflow.set_tag("checkpoint_epoch", str(epoch))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id:
            import mlflow

            mlflow.end_run(status=status)


# ----------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_params_arguments
    from .tracking import RUN_FILE

    add_params_arguments(parser)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (default: %(default)s)")
    parser.add_argument("--model-out", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("models/checkpoints"))
    parser.add_argument("--run-file", type=Path, default=RUN_FILE)
    parser.add_argument("--metrics-out", type=Path, default=Path("reports/train.json"))
    parser.add_argument("--history-out", type=Path, default=Path("reports/train_history.csv"))
    parser.add_argument("--curve-out", type=Path, default=Path("reports/train_curve.png"))
    parser.add_argument("--experiment", default="tinyssd", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")


def main(args: argparse.Namespace) -> int:
    from .params import load_params

    params = load_params(args.params, args.set)
    info = dist.init_distributed()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train(params, args, info)
    finally:  # leave the process as it was (tests call this in-process)
        torch.use_deterministic_algorithms(deterministic)
        dist.destroy_distributed()
    return 0


def _settings(params: dict[str, Any], world_size: int) -> dict[str, Any]:
    train = params.get("train") or {}
    missing = [k for k in ("epochs", "batch_size", "lr", "weight_decay") if k not in train]
    if missing:
        raise ValueError(f"params train section lacks {', '.join(missing)}")
    if int(train["epochs"]) < 1:
        raise ValueError(f"train.epochs={train['epochs']}: must be >= 1")
    lr_factor(str(train.get("lr_schedule", "constant")), int(train["epochs"]), float(train.get("warmup_epochs", 0)))
    if int(train["batch_size"]) % world_size:
        raise ValueError(f"train.batch_size={train['batch_size']} is the global batch and must divide evenly "
                         f"over {world_size} processes")
    return train


def train(params: dict[str, Any], args: argparse.Namespace, info: dist.DistInfo) -> dict[str, Any]:
    """The whole stage; returns the final metrics (on every rank)."""
    from .tracking import ensure_reachable, provenance, read_run_file, run_name, tracking_uri

    settings = _settings(params, info.world_size)
    fault = parse_fault(os.environ.get("SSD_FAULT"))
    device, main_proc = info.device, info.is_main
    precision = resolve_precision(str(settings.get("precision", "auto")), device)
    uri = ensure_reachable(tracking_uri()) if main_proc else ""  # before any training time is spent

    if settings.get("deterministic"):
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not settings.get("deterministic")
    seed = int((params.get("base") or {}).get("seed", 0))
    # The same seed on every rank: identical initial weights, and the sampler shards by rank itself.
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    data_params = params.get("data") or {}
    classes = list(data_params.get("classes", ["banana"]))
    dataset = load_dataset(args.data, "train", int(data_params.get("image_size", 256)), classes)
    check_boxes(dataset.labels[dataset.labels[..., 0] >= 0][:, 1:], f"labels of {dataset.split_dir}")
    fingerprint = data_fingerprint(dataset)

    model_params = params.get("model") or {}
    model = TinySSD(num_classes=len(classes), sizes=model_params.get("sizes"), ratios=model_params.get("ratios"),
                    classes=classes).to(device)
    channels_last = bool(settings.get("channels_last"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(settings["lr"]),
                                weight_decay=float(settings["weight_decay"]))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # Rank 0 reads the checkpoint and hands it to the others: on several nodes only it has the files.
    ckpt = None
    if main_proc and not args.fresh:
        ckpt = find_checkpoint(args.checkpoint_dir, params, fingerprint)
    if main_proc and ckpt is None:  # a fresh start: older checkpoints belong to another run
        for stale in args.checkpoint_dir.glob(CHECKPOINT_GLOB):
            stale.unlink()
    ckpt = dist.broadcast_object(ckpt)
    history: list[dict[str, float]] = []
    start_epoch, run_id = 0, None
    if ckpt is not None:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        run_id = ckpt.get("mlflow_run_id") or None
        if run_id is None and Path(args.run_file).is_file():
            run_id = read_run_file(args.run_file)["run_id"]
        if main_proc:
            print(f"resuming from {ckpt['path']} (epoch {start_epoch})", file=sys.stderr)
    del ckpt

    epochs = int(settings["epochs"])
    tracker = Tracker(main_proc)
    origin = provenance(args.data) if main_proc else {}  # hashes the data: rank 0 only
    tags = {**origin, "device": str(device), "device_name": _device_name(device),
            "world_size": str(info.world_size), "nnodes": os.environ.get("GROUP_WORLD_SIZE", "1"),
            "precision": precision, "train.epochs": str(epochs)}
    tracker.start(uri=uri, experiment=args.experiment, run_id=run_id,
                  run_name=run_name(origin.get("git_commit", "unknown")), params=params, tags=tags,
                  data=args.data, run_file=args.run_file)

    net: nn.Module = model
    if settings.get("compile"):
        net = torch.compile(net)
    if info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    loader = make_loader(dataset, int(settings["batch_size"]) // info.world_size, shuffle=True, seed=seed,
                         rank=info.rank, world_size=info.world_size, num_workers=int(settings.get("num_workers", 0)),
                         pin_memory=device.type == "cuda")
    scheduler = make_scheduler(optimizer, str(settings.get("lr_schedule", "constant")), epochs=epochs,
                               steps_per_epoch=len(loader), warmup_epochs=float(settings.get("warmup_epochs", 0)),
                               start_step=start_epoch * len(loader))
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_good = str(checkpoint_path(args.checkpoint_dir, start_epoch)) if start_epoch else "none"
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            metrics = train_one_epoch(net, loader, optimizer, scaler, epoch=epoch, device=device,
                                      autocast_dtype=AUTOCAST_DTYPES[precision], channels_last=channels_last,
                                      fault=fault, progress=main_proc, last_good=last_good,
                                      desc=f"epoch {epoch}/{epochs}", scheduler=scheduler,
                                      augment=partial(ssd_augment, generator=epoch_generator(
                                          seed, epoch, info.rank, device)) if settings.get("augment") else None)
            history.append({"epoch": epoch, **metrics})
            if main_proc:
                path = save_checkpoint(args.checkpoint_dir, model=model, optimizer=optimizer, scaler=scaler,
                                       epoch=epoch, params=params, history=history, data_fingerprint=fingerprint,
                                       run_id=tracker.run_id)
                last_good = str(path)
                atomic_write_text(args.history_out, history_csv(history))
                tracker.log_epoch(epoch, metrics, path)
                print(f"epoch {epoch}/{epochs}: loss {metrics['loss']:.3e}, class err {metrics['class_err']:.2e}, "
                      f"bbox mae {metrics['bbox_mae']:.2e}, {metrics['examples_per_sec']:.1f} examples/sec",
                      file=sys.stderr, flush=True)
        final = {**history[-1], "epochs": epochs, "world_size": info.world_size, "device": str(device),
                 "compute_dtype": precision,  # not "precision": eval.json has that metric
                 "mean_examples_per_sec": sum(h["examples_per_sec"] for h in history) / len(history)}
        if main_proc:
            atomic_write_text(args.history_out, history_csv(history))
            atomic_save_figure(curve_figure(history, epochs), args.curve_out, dpi=100)
            tracker.log_artifact(args.curve_out)
            save_model(model, args.model_out, params=params, history=history, mlflow_run_id=tracker.run_id)
            atomic_write_json(args.metrics_out, {**final, "provenance": origin})
            print(f"class err {final['class_err']:.2e}, bbox mae {final['bbox_mae']:.2e}\n"
                  f"{final['examples_per_sec']:.1f} examples/sec on {device} x {info.world_size} ({precision})")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return final


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()

