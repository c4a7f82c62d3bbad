"""What one training process works with, built from the typed settings before any file is touched."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssd.core.anchor_fit import fit_anchors
from ssd.core.boxes import check_boxes
from ssd.core.model import TinySSD, feature_map_sizes
from ssd.core.recipe import BOOK, PHOTOS_RECIPE, is_photos
from ssd.core.schedule import lr_factor
from ssd.data.dataset import DetectionDataset, StreamDataset, decode_workers, make_loader, open_split
from ssd.data.labels import LabelLimits
from ssd.engine import distributed as dist
from ssd.engine.checkpoint import data_fingerprint
from ssd.engine.ema import WeightAverage
from ssd.engine.precision import resolve_precision
from ssd.util.settings import DataSettings, ModelSettings, Settings, TrainSettings


@dataclass
class Setup:
    """What one process trains with."""
    info: dist.DistInfo
    train: TrainSettings
    seed: int                # base.seed
    params: dict[str, Any]   # the settings as plain values: what checkpoints and the model file record
    precision: str           # train.precision resolved on this device
    dataset: DetectionDataset | StreamDataset  # data.loader's: in memory or streamed
    fingerprint: str         # data_fingerprint(dataset)
    model: TinySSD
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: torch.utils.data.DataLoader
    recipe: str = BOOK       # train.recipe
    ema: WeightAverage | None = None  # the recipe's average of the weights (what gets saved), if any

    @property
    def photos(self) -> bool:
        return is_photos(self.recipe)

    @property
    def schedule(self) -> tuple[str, float]:
        """The lr schedule and warm-up epochs the recipe trains with."""
        return schedule(self.train)


def schedule(train: TrainSettings) -> tuple[str, float]:
    """``(lr schedule, warm-up epochs)`` of ``train``'s recipe: the params' for ``book``, the recipe's own
    (cosine with its warm-up) for ``photos``."""
    if is_photos(train.recipe):
        return "cosine", PHOTOS_RECIPE.warmup(train.epochs)
    return train.lr_schedule, train.warmup_epochs


def build(settings: Settings, data: Path, info: dist.DistInfo) -> Setup:
    """Data, model, optimizer and loader for this process, with the settings' seed and precision.

    ``settings``: the train stage's (``base``, ``model``, ``train`` and ``data.classes``,
    ``data.image_size``, ``data.max_image_pixels``, ``data.loader``); ``data``: the dataset root.
    """
    train, seed, device = settings.train, settings.base.seed, info.device
    photos = is_photos(train.recipe)
    batch_size = PHOTOS_RECIPE.batch_size if photos else train.batch_size
    if batch_size % info.world_size:
        what = "the photos recipe's batch" if photos else "train.batch_size"
        raise ValueError(f"{what}={batch_size} is the global batch and must divide evenly "
                         f"over {info.world_size} processes")
    precision = resolve_precision(train.precision, device)
    kind, warmup = schedule(train)
    lr_factor(kind, train.epochs, warmup)  # refused before any file is touched
    _seed_everything(seed, train.deterministic)
    dataset = open_split(data, "train", settings.data.image_size, settings.data.classes,
                         settings.data.max_image_pixels, LabelLimits.of(settings.data), settings.data.loader)
    check_boxes(dataset.index.rows[:, 1:], f"labels of {dataset.split_dir}")  # pixels: the same order
    model = (make_photos_model(dataset, settings.data, train.channels_last, device) if photos
             else make_model(settings.model, settings.data, train.channels_last, device))
    optimizer = make_optimizer(model, train, device)
    fingerprint = data_fingerprint(dataset)
    return Setup(info=info, train=train, seed=seed, params=settings.as_dict(), precision=precision,
                 dataset=dataset, fingerprint=fingerprint, model=model, optimizer=optimizer,
                 scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                 loader=_loader(dataset, batch_size, train.num_workers, seed, info), recipe=train.recipe,
                 ema=WeightAverage(model, PHOTOS_RECIPE.ema_decay) if photos else None)


def make_model(model: ModelSettings, data: DataSettings, channels_last: bool, device: torch.device) -> TinySSD:
    """A fresh TinySSD for ``data.classes`` at ``data.image_size`` (weights from torch's RNG)."""
    net = TinySSD(num_classes=len(data.classes), sizes=model.sizes, ratios=model.ratios, classes=data.classes,
                  image_size=data.image_size).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def make_optimizer(model: nn.Module, train: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """SGD with the train params (``book``), or the ``photos`` recipe's AdamW."""
    if is_photos(train.recipe):
        return torch.optim.AdamW(model.parameters(), lr=PHOTOS_RECIPE.lr, weight_decay=PHOTOS_RECIPE.weight_decay)
    # Fused on GPUs: one kernel, and GradScaler then needs no host read of its inf check per step.
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay, fused=device.type == "cuda")


def make_photos_model(dataset: DetectionDataset | StreamDataset, data: DataSettings, channels_last: bool,
                      device: torch.device) -> TinySSD:
    """The ``photos`` recipe's TinySSD (``ssd.core.recipe``): its width and fusion, and anchors fitted to
    the boxes of ``dataset`` (the training split) at ``data.image_size``."""
    size = data.image_size
    sizes, ratios = fit_anchors(training_boxes(dataset), feature_map_sizes(size, size))
    net = TinySSD(num_classes=len(data.classes), sizes=sizes, ratios=ratios, classes=data.classes, image_size=size,
                  width=PHOTOS_RECIPE.width, fusion=PHOTOS_RECIPE.fusion).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def training_boxes(dataset: DetectionDataset | StreamDataset, max_images: int = 2048) -> torch.Tensor:
    """Corner boxes ``Tensor[N, 4]`` in [0, 1] of the split's images (of at most ``max_images`` of them,
    evenly spaced, for a streamed split: each must be decoded for its size)."""
    if isinstance(dataset, DetectionDataset):
        return dataset.rows[:-1, 1:].cpu()
    picks = torch.linspace(0, len(dataset) - 1, min(len(dataset), max_images)).long().unique().tolist()
    return torch.cat([dataset[i][1][:, 1:] for i in picks])


def _loader(dataset: DetectionDataset | StreamDataset, batch_size: int, num_workers: int, seed: int,
            info: dist.DistInfo) -> torch.utils.data.DataLoader:
    """This rank's shard of every epoch, ``batch_size / world_size`` per step (the global batch).

    ``num_workers`` (``train.num_workers``) 0 sizes the workers from the machine: none for a split in
    memory (a batch is one gather, on the GPU when the split fits there), :func:`decode_workers` for a
    streamed one.
    Pinned memory whenever batches come from the host to a GPU."""
    device = info.device
    streamed = isinstance(dataset, StreamDataset)
    workers = num_workers or (decode_workers() if streamed else 0)
    resident = not streamed and keep_on_device(dataset, device, workers)
    return make_loader(dataset, batch_size // info.world_size, shuffle=True, seed=seed, rank=info.rank,
                       world_size=info.world_size, num_workers=workers,
                       pin_memory=device.type == "cuda" and not resident,
                       prefetch_factor=4 if streamed else None)


def keep_on_device(dataset: DetectionDataset, device: torch.device, num_workers: int,
                   max_share: float = 0.25) -> bool:
    """Move the uint8 split onto a GPU when it fits in ``max_share`` of its free memory, so that no
    training step copies images from the host; returns whether it moved. DataLoader workers cannot
    hand out CUDA tensors, so ``num_workers > 0`` keeps it on the host."""
    if device.type != "cuda" or num_workers > 0:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    if dataset.nbytes > max_share * free:
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


def parallel(model: nn.Module, info: dist.DistInfo, compile: bool) -> nn.Module:
    """The module the loop calls: DDP across processes, then compiled (DDP's documented order)."""
    net = model
    if info.world_size > 1:
        device = info.device
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(net) if compile else net


def run_tags(setup: Setup) -> dict[str, str]:
    """Where and how this run trains, as strings (the MLflow run's tags)."""
    device = setup.info.device
    return {"device": str(device), "device_name": _device_name(device), "world_size": str(setup.info.world_size),
            "nnodes": os.environ.get("GROUP_WORLD_SIZE", "1"), "precision": setup.precision,
            "train.epochs": str(setup.train.epochs)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()
