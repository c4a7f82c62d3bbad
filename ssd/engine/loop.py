"""Train TinySSD with the seed's recipe; the same code runs alone or under ``torchrun``.

``train.batch_size`` is the GLOBAL batch: each of N processes takes ``batch_size / N``, so the
recipe (SGD, lr 0.2, weight decay 5e-4, batch 32) is unchanged by the process count. Only rank 0
writes files and reports to the run log. Every epoch ends with a checkpoint in the checkpoint
folder; a rerun resumes from the newest one whose params match (all of base/data/model/train but
``train.epochs``: ``ssd.engine.checkpoint``), so ``dvc repro`` after a crash, or ``torchrun
--max-restarts``, continue where the run stopped.

A second training in the same workspace is refused while the first runs (a lock beside the
checkpoint folder names its holder); checkpoints of an earlier run are removed only once the new run
has finished its first epoch, so a bad param or a crash at start loses nothing.

The steps: ``ssd.engine.setup.build`` -> :func:`resume` -> :func:`fit` -> :func:`finish`; the
train stage (``ssd.stages.train``) runs them inside :func:`workspace_lock` and hands in its MLflow
run as a :class:`RunLog`.
"""
from __future__ import annotations

import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ssd.core.augment import epoch_generator, photos_augment, ssd_augment
from ssd.core.model import save_model, unwrap
from ssd.core.recipe import BOOK
from ssd.core.schedule import make_scheduler
from ssd.engine import distributed as dist
from ssd.engine.ema import WeightAverage
from ssd.engine.checkpoint import (CHECKPOINT_GLOB, checkpoint_path, find_checkpoint, prune_checkpoints,
                                   save_checkpoint, set_rng_state)
from ssd.engine.history import curve_figure, history_csv
from ssd.engine.precision import AUTOCAST_DTYPES
from ssd.engine.setup import Setup, parallel
from ssd.engine.step import NO_BAD_STEP, Tally, train_step
from ssd.util.files import atomic_save_figure, atomic_write_json, atomic_write_text

CHECK_EVERY = 10  # steps between (collective) checks for a non-finite loss


@dataclass(frozen=True)
class TrainPaths:
    """What ``ssd train`` reads and writes (its arguments; the defaults are ``ssd.data.layout``'s)."""
    data: Path               # the dataset root
    model_out: Path
    checkpoint_dir: Path
    run_file: Path           # names the MLflow run beside the model
    metrics_out: Path
    history_out: Path
    curve_out: Path
    experiment: str          # the MLflow experiment
    fresh: bool = False      # ignore existing checkpoints


class RunLog(Protocol):
    """Where rank 0 reports the training (``ssd.mlops.training_run.Tracker``, a no-op on other ranks)."""
    run_id: str

    def log_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Path) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def write_run_file(self, path: Path) -> None: ...


@dataclass
class Progress:
    """Where training stands: the epochs done so far and the run they were logged in."""
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    stale: list[Path] = field(default_factory=list)  # an earlier run's checkpoints, removed after epoch 1


# ----------------------------------------------------------------------------------------------
# One epoch

def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, epoch: int, device: torch.device,
                    autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                    progress: bool = False, last_good: str = "none", desc: str = "",
                    augment: Callable | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, recipe: str = BOOK,
                    ema: WeightAverage | None = None) -> dict[str, float]:
    """One pass over the loader with ``recipe``'s loss; returns the epoch's metrics reduced over all ranks.

    ``augment(images, labels) -> (images, labels)`` transforms each batch on the device;
    ``scheduler`` steps after every optimizer step (see ``ssd.core.schedule``), and so does ``ema``.
    """
    from tqdm import tqdm

    model.train()
    loader.sampler.set_epoch(epoch)
    tally, start = Tally(device), time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=1.0, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if augment is not None:
            images, labels = augment(images, labels)
        loss, stats = train_step(model, optimizer, scaler, images, labels, autocast_dtype=autocast_dtype,
                                 channels_last=channels_last, epoch=epoch, step=step, recipe=recipe)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(unwrap(model))
        tally.add(step, loss, stats)
        if step % CHECK_EVERY == 0:  # not every step: each check waits for the device
            _raise_if_nonfinite(tally, epoch, last_good)
            if progress:
                bar.set_postfix(loss=f"{(tally.sums[0] / tally.sums[1]).item():.3g}")
    _raise_if_nonfinite(tally, epoch, last_good)
    loss_sum, n, correct, anchors, abs_err, bbox_n = dist.all_reduce_sum(tally.sums).tolist()
    return {"loss": loss_sum / n, "class_err": 1 - correct / anchors, "bbox_mae": abs_err / bbox_n,
            "examples_per_sec": n / (time.perf_counter() - start)}


def _raise_if_nonfinite(tally: Tally, epoch: int, last_good: str) -> None:
    """Collective: every rank learns the first bad step, so all stop together."""
    bad = int(dist.all_reduce_min(tally.first_bad.clone()).item())
    if bad < NO_BAD_STEP:
        raise RuntimeError(f"non-finite loss at epoch {epoch} step {bad}: training stopped; "
                           f"last good checkpoint: {last_good}")


# ----------------------------------------------------------------------------------------------
# The run: resume -> fit -> finish

def resume(setup: Setup, paths: TrainPaths) -> Progress:
    """Load the newest matching checkpoint into ``setup`` (every rank), or start at epoch 0."""
    progress = Progress()
    ckpt = None
    # Rank 0 reads the checkpoint and hands it to the others: on several nodes only it has the files.
    if setup.info.is_main:
        ckpt = None if paths.fresh else find_checkpoint(paths.checkpoint_dir, setup.params, setup.fingerprint,
                                                        setup.train.epochs)
        if ckpt is None:  # kept until this run has a checkpoint of its own
            progress.stale = sorted(paths.checkpoint_dir.glob(CHECKPOINT_GLOB))
    ckpt = dist.broadcast_object(ckpt)
    if ckpt is None:
        return progress
    setup.model.load_state_dict(ckpt["model"])
    setup.optimizer.load_state_dict(ckpt["optimizer"])
    setup.scaler.load_state_dict(ckpt["scaler"])
    if setup.ema is not None:
        setup.ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    progress.epoch, progress.history = int(ckpt["epoch"]), list(ckpt["history"])
    progress.run_id = ckpt["mlflow_run_id"] or None
    if setup.info.is_main:
        print(f"resuming from {ckpt['path']} (epoch {progress.epoch})", file=sys.stderr)
    return progress


def fit(setup: Setup, progress: Progress, paths: TrainPaths, log: RunLog) -> None:
    """Train from ``progress.epoch + 1`` to ``train.epochs``, with a checkpoint after every epoch."""
    info, train = setup.info, setup.train
    net = parallel(setup.model, info, train.compile)
    steps = len(setup.loader)
    kind, warmup = setup.schedule
    scheduler = make_scheduler(setup.optimizer, kind, epochs=train.epochs, steps_per_epoch=steps,
                               warmup_epochs=warmup, start_step=progress.epoch * steps)
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_good = str(checkpoint_path(paths.checkpoint_dir, progress.epoch)) if progress.epoch else "none"
    for epoch in range(progress.epoch + 1, train.epochs + 1):
        metrics = train_one_epoch(net, setup.loader, setup.optimizer, setup.scaler, epoch=epoch, device=info.device,
                                  autocast_dtype=AUTOCAST_DTYPES[setup.precision], channels_last=train.channels_last,
                                  progress=info.is_main, last_good=last_good, desc=f"epoch {epoch}/{train.epochs}",
                                  scheduler=scheduler, augment=_augmentation(setup, epoch), recipe=setup.recipe,
                                  ema=setup.ema)
        progress.epoch = epoch
        progress.history.append({"epoch": epoch, **metrics})
        if info.is_main:
            last_good = str(_record_epoch(setup, progress, paths, log, metrics))


def _record_epoch(setup: Setup, progress: Progress, paths: TrainPaths, log: RunLog,
                  metrics: dict[str, float]) -> Path:
    """Rank 0, after each epoch: the checkpoint (then an earlier run's go), the MLflow log."""
    path = save_checkpoint(paths.checkpoint_dir, model=setup.model, optimizer=setup.optimizer,
                           scaler=setup.scaler, epoch=progress.epoch, params=setup.params, history=progress.history,
                           data_fingerprint=setup.fingerprint, run_id=log.run_id, ema=setup.ema)
    prune_checkpoints(paths.checkpoint_dir, keep=path, stale=progress.stale)
    progress.stale = []
    log.log_epoch(progress.epoch, metrics, path)  # the history CSV is written with the model, at the end
    print(f"epoch {progress.epoch}/{setup.train.epochs}: loss {metrics['loss']:.3e}, "
          f"class err {metrics['class_err']:.2e}, bbox mae {metrics['bbox_mae']:.2e}, "
          f"{metrics['examples_per_sec']:.1f} examples/sec", file=sys.stderr, flush=True)
    return path


def finish(setup: Setup, progress: Progress, paths: TrainPaths, log: RunLog,
           origin: dict[str, str]) -> dict[str, Any]:
    """The model, the metrics (with ``origin``, the run's provenance) and the curve (rank 0 writes);
    returns the final metrics."""
    history, device, epochs = progress.history, setup.info.device, setup.train.epochs
    final = {**history[-1], "epochs": epochs, "world_size": setup.info.world_size, "device": str(device),
             "compute_dtype": setup.precision,  # not "precision": eval.json has that metric
             "mean_examples_per_sec": sum(h["examples_per_sec"] for h in history) / len(history)}
    if not setup.info.is_main:
        return final
    # The model first: a failure (a full disk) leaves no report describing a model that is not there.
    # The recipe's weight average, when it keeps one, is the model.
    net = setup.ema.module if setup.ema is not None else setup.model
    save_model(net, paths.model_out, params=setup.params, history=history, mlflow_run_id=log.run_id)
    log.write_run_file(paths.run_file)
    atomic_write_text(paths.history_out, history_csv(history))
    atomic_save_figure(curve_figure(history, epochs), paths.curve_out, dpi=100)
    log.log_artifact(paths.curve_out)
    atomic_write_json(paths.metrics_out, {**final, "provenance": origin})
    print(f"class err {final['class_err']:.2e}, bbox mae {final['bbox_mae']:.2e}\n"
          f"{final['examples_per_sec']:.1f} examples/sec on {device} x {setup.info.world_size} ({setup.precision})")
    return final


def _augmentation(setup: Setup, epoch: int) -> Callable | None:
    """The epoch's augmentation (``train.augment``, or the ``photos`` recipe's), seeded by (seed, epoch,
    rank) so a resume redraws it."""
    if not (setup.photos or setup.train.augment):
        return None
    info = setup.info
    return partial(photos_augment if setup.photos else ssd_augment,
                   generator=epoch_generator(setup.seed, epoch, info.rank, info.device))


@contextmanager
def workspace_lock(checkpoint_dir: Path, info: dist.DistInfo) -> Iterator[None]:
    """One training per checkpoint folder at a time: rank 0 holds the lock, every rank learns the outcome."""
    from ssd.util.files import LockHeld, exclusive_lock, lock_file

    with ExitStack() as stack:
        refusal = None
        if info.is_main:
            try:
                stack.enter_context(exclusive_lock(lock_file(checkpoint_dir)))
            except LockHeld as exc:
                refusal = f"another training is using {checkpoint_dir}: {exc}"
        refusal = dist.broadcast_object(refusal)
        if refusal:
            raise RuntimeError(refusal)
        yield
