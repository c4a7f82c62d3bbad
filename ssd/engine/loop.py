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

A second training in the same workspace is refused while the first runs (a lock beside the
checkpoint folder names its holder); checkpoints of an earlier run are removed only once the new run
has finished its first epoch, so a bad param or a crash at start loses nothing.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import os
import random
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ssd.engine import distributed as dist
from ssd.core.anchors import multibox_target
from ssd.core.augment import epoch_generator, ssd_augment
from ssd.core.boxes import check_boxes
from ssd.data.dataset import DetectionDataset, load_dataset, make_loader
from ssd.util.files import atomic_save_figure, atomic_torch_save, atomic_write_json, atomic_write_text
from ssd.core.loss import bbox_eval, calc_loss, cls_eval
from ssd.core.model import TinySSD, as_input, save_model, unwrap
from ssd.core.schedule import lr_factor, make_scheduler

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
        # Emulation counted, a V100 or T4 would say yes and run bf16 slower than fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and oneDNN is there to use it."""
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
# Step hooks: see a batch and its loss, or replace the loss (tests inject faults this way)

@dataclass
class TrainStep:
    """What a step hook sees: the step (epoch and step count from 1), this process's batch
    (``uint8 Tensor[b, 3, S, S]``), its loss before backward, and the module being trained."""
    epoch: int
    step: int
    images: torch.Tensor
    loss: torch.Tensor
    model: nn.Module


StepHook = Callable[[TrainStep], "torch.Tensor | None"]
_step_hooks: list[StepHook] = []


def register_step_hook(hook: StepHook) -> Callable[[], None]:
    """Call ``hook(TrainStep)`` at every training step, between forward and backward.

    A tensor returned replaces the loss (a test makes it NaN, say); ``None`` keeps it. Returns a
    function that removes the hook.
    """
    _step_hooks.append(hook)
    return lambda: _step_hooks.remove(hook) if hook in _step_hooks else None


def _run_step_hooks(step: TrainStep) -> torch.Tensor:
    for hook in list(_step_hooks):
        replaced = hook(step)
        step.loss = step.loss if replaced is None else replaced
    return step.loss


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
    X = as_input(images, channels_last=channels_last)
    autocast = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    with autocast:
        anchors, cls_preds, bbox_preds = model(X)
    bbox_labels, bbox_masks, cls_labels = multibox_target(anchors, labels, check=False)
    per_example = calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    with torch.no_grad():
        # The counts are shapes, known on the host: filled on the device (a kernel), never copied
        # from the host (``torch.tensor(..., device=...)`` would be a synchronizing copy each step).
        sums = torch.stack([per_example.detach().sum().double(), cls_eval(cls_preds, cls_labels).double(),
                            bbox_eval(bbox_preds, bbox_labels, bbox_masks).double()])
        counts = [torch.full((), float(n), dtype=torch.float64, device=images.device)
                  for n in (len(images), cls_labels.numel(), bbox_labels.numel())]
        stats = torch.stack([sums[0], counts[0], sums[1], counts[1], sums[2], counts[2]])
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
                    progress: bool = False, last_good: str = "none", desc: str = "",
                    augment: Callable | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict[str, float]:
    """One pass over the loader; returns the epoch's metrics reduced over all ranks.

    ``augment(images, labels) -> (images, labels)`` transforms each batch on the device;
    ``scheduler`` steps after every optimizer step (see ``ssd.core.schedule``).
    """
    from tqdm import tqdm

    model.train()
    loader.sampler.set_epoch(epoch)
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
        if _step_hooks:
            loss = _run_step_hooks(TrainStep(epoch, step, images, loss, model))
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
    # Onto this process's current GPU (older checkpoints listed every visible GPU: the first is
    # rank 0's own). Nothing to do for a process that runs on the CPU.
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
                    data_fingerprint: str, run_id: str) -> Path:
    """Write ``epoch_NNNN.pt`` atomically (older checkpoints stay: see ``prune_checkpoints``)."""
    net = unwrap(model)
    path = checkpoint_path(directory, epoch)
    atomic_torch_save({
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


CODE_MODULES = ("ssd.engine.loop", "ssd.core.model", "ssd.core.anchors", "ssd.core.boxes", "ssd.core.loss",
                "ssd.data.dataset", "ssd.data.images", "ssd.data.labels", "ssd.core.augment", "ssd.core.schedule")


def code_fingerprint() -> str:
    """SHA-1 of the training code: a checkpoint is only resumed by the code that made it."""
    digest = hashlib.sha1()
    for name in CODE_MODULES:
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
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


# ----------------------------------------------------------------------------------------------
# The stage, in steps: build -> resume -> fit -> finish

@dataclass
class Setup:
    """What one process trains with; built before any file or MLflow run is touched."""
    info: dist.DistInfo
    epochs: int
    precision: str
    channels_last: bool
    dataset: DetectionDataset
    fingerprint: str
    model: TinySSD
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader


@dataclass
class Progress:
    """Where training stands: the epochs done so far and the MLflow run they belong to."""
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    stale: list[Path] = field(default_factory=list)  # an earlier run's checkpoints, removed after epoch 1


def train(params: dict[str, Any], args: argparse.Namespace, info: dist.DistInfo, uri: str) -> dict[str, Any]:
    """The whole stage, tracked in MLflow at ``uri`` (rank 0); returns the final metrics (on every rank)."""
    from ssd.mlops.provenance import provenance
    from ssd.mlops.tracking import Tracker, run_name

    setup = build(params, args.data, info)
    progress = resume(setup, params, args)
    origin = provenance(args.data) if info.is_main else {}  # hashes the data: rank 0 only
    tracker = Tracker(info.is_main)
    tracker.start(uri=uri, experiment=args.experiment, run_id=progress.run_id,
                  run_name=run_name(origin.get("git_commit", "unknown")), params=params,
                  tags={**origin, **_run_tags(setup)}, data=args.data)
    try:
        fit(setup, progress, params, args, tracker)
        final = finish(setup, progress, params, args, tracker, origin)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return final


def build(params: dict[str, Any], data: Path, info: dist.DistInfo) -> Setup:
    """Data, model, optimizer and loader for this process, with the params' seed and precision."""
    settings = params["train"]
    if settings["batch_size"] % info.world_size:
        raise ValueError(f"train.batch_size={settings['batch_size']} is the global batch and must divide evenly "
                         f"over {info.world_size} processes")
    device = info.device
    precision = resolve_precision(settings["precision"], device)
    lr_factor(settings["lr_schedule"], settings["epochs"], settings["warmup_epochs"])  # refused before any file is touched
    _seed_everything(params["base"]["seed"], settings["deterministic"])

    classes = list(params["data"]["classes"])
    dataset = load_dataset(data, "train", params["data"]["image_size"], classes, params["data"]["max_image_pixels"])
    check_boxes(dataset.labels[dataset.labels[..., 0] >= 0][:, 1:], f"labels of {dataset.split_dir}")
    model = TinySSD(num_classes=len(classes), sizes=params["model"]["sizes"], ratios=params["model"]["ratios"],
                    classes=classes, image_size=params["data"]["image_size"]).to(device)
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # Fused on GPUs: one kernel, and GradScaler then needs no host read of its inf check per step.
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"], fused=device.type == "cuda")
    fingerprint = data_fingerprint(dataset)
    resident = keep_on_device(dataset, device, settings["num_workers"])
    loader = make_loader(dataset, settings["batch_size"] // info.world_size, shuffle=True,
                         seed=params["base"]["seed"], rank=info.rank, world_size=info.world_size,
                         num_workers=settings["num_workers"], pin_memory=device.type == "cuda" and not resident)
    return Setup(info=info, epochs=settings["epochs"], precision=precision, channels_last=settings["channels_last"],
                 dataset=dataset, fingerprint=fingerprint, model=model, optimizer=optimizer,
                 scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"), loader=loader)


def keep_on_device(dataset: DetectionDataset, device: torch.device, num_workers: int,
                   max_share: float = 0.25) -> bool:
    """Move the uint8 split onto a GPU when it fits in ``max_share`` of its free memory, so that no
    training step copies images from the host; returns whether it moved. DataLoader workers cannot
    hand out CUDA tensors, so ``num_workers > 0`` keeps it on the host."""
    if device.type != "cuda" or num_workers > 0:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    if dataset.images.nbytes + dataset.labels.nbytes > max_share * free:
        return False
    dataset.to(device)
    return True


def _seed_everything(seed: int, deterministic: bool) -> None:
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    # The same seed on every rank: identical initial weights, and the sampler shards by rank itself.
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def resume(setup: Setup, params: dict[str, Any], args: argparse.Namespace) -> Progress:
    """Load the newest matching checkpoint into ``setup`` (every rank), or start at epoch 0."""
    from ssd.mlops.tracking import read_run_file

    progress = Progress()
    ckpt = None
    # Rank 0 reads the checkpoint and hands it to the others: on several nodes only it has the files.
    if setup.info.is_main:
        ckpt = None if args.fresh else find_checkpoint(args.checkpoint_dir, params, setup.fingerprint)
        if ckpt is None:  # kept until this run has a checkpoint of its own
            progress.stale = sorted(args.checkpoint_dir.glob(CHECKPOINT_GLOB))
    ckpt = dist.broadcast_object(ckpt)
    if ckpt is None:
        return progress
    setup.model.load_state_dict(ckpt["model"])
    setup.optimizer.load_state_dict(ckpt["optimizer"])
    setup.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    progress.epoch, progress.history = int(ckpt["epoch"]), list(ckpt["history"])
    progress.run_id = ckpt.get("mlflow_run_id") or None
    if progress.run_id is None and Path(args.run_file).is_file():
        progress.run_id = read_run_file(args.run_file)["run_id"]
    if setup.info.is_main:
        print(f"resuming from {ckpt['path']} (epoch {progress.epoch})", file=sys.stderr)
    return progress


def parallel(model: nn.Module, info: dist.DistInfo, compile: bool) -> nn.Module:
    """The module the loop calls: DDP across processes, then compiled (DDP's documented order)."""
    net = model
    if info.world_size > 1:
        device = info.device
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(net) if compile else net


def fit(setup: Setup, progress: Progress, params: dict[str, Any], args: argparse.Namespace, tracker: Any) -> None:
    """Train from ``progress.epoch + 1`` to ``setup.epochs``, with a checkpoint after every epoch."""
    settings, info = params["train"], setup.info
    net = parallel(setup.model, info, settings["compile"])
    steps = len(setup.loader)
    scheduler = make_scheduler(setup.optimizer, settings["lr_schedule"], epochs=setup.epochs, steps_per_epoch=steps,
                               warmup_epochs=settings["warmup_epochs"], start_step=progress.epoch * steps)
    main_proc = info.is_main
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_good = str(checkpoint_path(args.checkpoint_dir, progress.epoch)) if progress.epoch else "none"
    for epoch in range(progress.epoch + 1, setup.epochs + 1):
        metrics = train_one_epoch(net, setup.loader, setup.optimizer, setup.scaler, epoch=epoch,
                                  device=setup.info.device, autocast_dtype=AUTOCAST_DTYPES[setup.precision],
                                  channels_last=setup.channels_last, progress=main_proc, last_good=last_good,
                                  desc=f"epoch {epoch}/{setup.epochs}", scheduler=scheduler,
                                  augment=_augmentation(params, epoch, info))
        progress.epoch = epoch
        progress.history.append({"epoch": epoch, **metrics})
        if not main_proc:
            continue
        path = save_checkpoint(args.checkpoint_dir, model=setup.model, optimizer=setup.optimizer,
                               scaler=setup.scaler, epoch=epoch, params=params, history=progress.history,
                               data_fingerprint=setup.fingerprint, run_id=tracker.run_id)
        prune_checkpoints(args.checkpoint_dir, keep=path, stale=progress.stale)
        progress.stale, last_good = [], str(path)
        atomic_write_text(args.history_out, history_csv(progress.history))
        tracker.log_epoch(epoch, metrics, path)
        print(f"epoch {epoch}/{setup.epochs}: loss {metrics['loss']:.3e}, class err {metrics['class_err']:.2e}, "
              f"bbox mae {metrics['bbox_mae']:.2e}, {metrics['examples_per_sec']:.1f} examples/sec",
              file=sys.stderr, flush=True)


def finish(setup: Setup, progress: Progress, params: dict[str, Any], args: argparse.Namespace, tracker: Any,
           origin: dict[str, str]) -> dict[str, Any]:
    """The model, the metrics and the curve (rank 0 writes); returns the final metrics."""
    history, device = progress.history, setup.info.device
    final = {**history[-1], "epochs": setup.epochs, "world_size": setup.info.world_size, "device": str(device),
             "compute_dtype": setup.precision,  # not "precision": eval.json has that metric
             "mean_examples_per_sec": sum(h["examples_per_sec"] for h in history) / len(history)}
    if not setup.info.is_main:
        return final
    atomic_write_text(args.history_out, history_csv(history))
    atomic_save_figure(curve_figure(history, setup.epochs), args.curve_out, dpi=100)
    tracker.log_artifact(args.curve_out)
    save_model(setup.model, args.model_out, params=params, history=history, mlflow_run_id=tracker.run_id)
    tracker.write_run_file(args.run_file)
    atomic_write_json(args.metrics_out, {**final, "provenance": origin})
    print(f"class err {final['class_err']:.2e}, bbox mae {final['bbox_mae']:.2e}\n"
          f"{final['examples_per_sec']:.1f} examples/sec on {device} x {setup.info.world_size} ({setup.precision})")
    return final


def _augmentation(params: dict[str, Any], epoch: int, info: dist.DistInfo) -> Callable | None:
    """The epoch's augmentation (``train.augment``), seeded by (seed, epoch, rank) so a resume redraws it."""
    if not params["train"]["augment"]:
        return None
    return partial(ssd_augment, generator=epoch_generator(params["base"]["seed"], epoch, info.rank, info.device))


def _run_tags(setup: Setup) -> dict[str, str]:
    device = setup.info.device
    return {"device": str(device), "device_name": _device_name(device), "world_size": str(setup.info.world_size),
            "nnodes": os.environ.get("GROUP_WORLD_SIZE", "1"), "precision": setup.precision,
            "train.epochs": str(setup.epochs)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


@contextmanager
def workspace_lock(checkpoint_dir: Path, info: dist.DistInfo) -> Iterator[None]:
    """One training per checkpoint folder at a time: rank 0 holds the lock, every rank learns the outcome."""
    from ssd.util.files import LockHeld, exclusive_lock

    with ExitStack() as stack:
        refusal = None
        if info.is_main:
            try:
                stack.enter_context(exclusive_lock(checkpoint_dir.with_name(checkpoint_dir.name + ".lock")))
            except LockHeld as exc:
                refusal = f"another training is using {checkpoint_dir}: {exc}"
        refusal = dist.broadcast_object(refusal)
        if refusal:
            raise RuntimeError(refusal)
        yield
