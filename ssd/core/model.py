"""TinySSD: the seed's single-shot multibox detector.

Layer names (``blk_i``, ``cls_i``, ``bbox_i``) are the book's, so its state dicts load here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ssd.core.anchors import multibox_prior
from ssd.core.fusion import TopDown

SEED_SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
SEED_RATIOS = [1.0, 2.0, 0.5]


@dataclass
class SSDConfig:
    """What it takes to rebuild a TinySSD; stored in every checkpoint and model file."""

    num_classes: int = 1
    sizes: list[list[float]] = field(default_factory=lambda: [list(s) for s in SEED_SIZES])
    ratios: list[float] = field(default_factory=lambda: list(SEED_RATIOS))
    classes: list[str] = field(default_factory=lambda: ["banana"])
    width: float = 1.0      # channel multiplier of every layer (the book's net: 1)
    fusion: bool = False    # top-down fusion: each scale also sees the coarser ones (the book's net: none)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.sizes) != 5:
            raise ValueError(f"TinySSD has 5 scales: need 5 size lists, got {len(self.sizes)}")
        if len({len(s) for s in self.sizes}) != 1 or not self.ratios:
            raise ValueError("every scale needs the same number of sizes, and ratios must not be empty")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if not 0.25 <= self.width <= 4 or not isinstance(self.fusion, bool):
            raise ValueError(f"width must be in [0.25, 4] and fusion a bool, got {self.width!r}, {self.fusion!r}")

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map pixel."""
        return len(self.sizes[0]) + len(self.ratios) - 1


def cls_predictor(num_inputs: int, num_anchors: int, num_classes: int) -> nn.Conv2d:
    return nn.Conv2d(num_inputs, num_anchors * (num_classes + 1), kernel_size=3, padding=1)


def bbox_predictor(num_inputs: int, num_anchors: int) -> nn.Conv2d:
    return nn.Conv2d(num_inputs, num_anchors * 4, kernel_size=3, padding=1)


def down_sample_blk(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers, then a 2x2 max-pool that halves height and width."""
    blk: list[nn.Module] = []
    for _ in range(2):
        # In-place ReLU reuses the batch-norm output (batch norm's backward does not need it):
        # one activation tensor less per layer, the largest allocations of a training step.
        blk += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        in_channels = out_channels
    blk.append(nn.MaxPool2d(2))
    return nn.Sequential(*blk)


def _scaled(counts: tuple[int, ...], width: float) -> list[int]:
    return [max(1, round(c * width)) for c in counts]


def channels(width: float = 1.0) -> list[int]:
    """Output channels of the five blocks (the book's: 64, 128, 128, 128, 128) times ``width``."""
    return _scaled((64, 128, 128, 128, 128), width)


def base_net(width: float = 1.0) -> nn.Sequential:
    filters = [3, *_scaled((16, 32, 64), width)]
    return nn.Sequential(*[down_sample_blk(filters[i], filters[i + 1]) for i in range(len(filters) - 1)])


class GlobalMaxPool(nn.Module):
    """``Tensor[B, C, H, W]`` -> ``Tensor[B, C, 1, 1]``: the book's ``nn.AdaptiveMaxPool2d((1, 1))``
    (same outputs, no parameters, so the same state dict) as an ``amax`` over H and W, whose CUDA
    backward is deterministic (adaptive max-pool's is not: ``train.deterministic`` would fail)."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.amax(dim=(2, 3), keepdim=True)


def get_blk(i: int, width: float = 1.0) -> nn.Module:
    if i == 0:
        return base_net(width)
    if i == 4:
        return GlobalMaxPool()
    return down_sample_blk(*channels(width)[i - 1:i + 1])


def feature_map_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """The (H, W) of the five feature maps for an input of ``height`` x ``width``: each 2x2
    max-pool floors (three in the base net), the last scale is the global max."""
    sizes, h, w = [], height // 8, width // 8
    for _ in range(4):
        sizes.append((h, w))
        h, w = h // 2, w // 2
    return sizes + [(1, 1)]


def as_input(images: torch.Tensor, device: torch.device | None = None, channels_last: bool = True) -> torch.Tensor:
    """``uint8 Tensor[B, 3, S, S]`` (0..255, as the seed feeds them) as the net's float32 input, in one copy.

    Channels-last by default: the convolutions run in that layout (weights in either) and are faster
    in it, on CPUs (oneDNN: about 1.7x on the whole net in inference) and on GPUs (tensor cores).
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device).to(torch.float32, memory_format=layout)


def flatten_pred(pred: torch.Tensor) -> torch.Tensor:
    """``Tensor[B, C, H, W]`` -> ``Tensor[B, H*W*C]``, pixel-major like the anchors."""
    return torch.flatten(pred.permute(0, 2, 3, 1), start_dim=1)


def concat_preds(preds: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([flatten_pred(p) for p in preds], dim=1)


class TinySSD(nn.Module):
    """Five-scale SSD.

    ``forward(X Tensor[B, 3, H, W])`` returns ``anchors Tensor[1, A, 4]`` (float32),
    ``cls_preds Tensor[B, A, num_classes + 1]`` and ``bbox_preds Tensor[B, A * 4]``;
    A = 5444 for a 256x256 input with the seed's sizes and ratios.

    The anchors for ``image_size`` inputs are a buffer made once (not in the state dict, so model
    files are unchanged); other input sizes get theirs computed on each call. Nothing is mutated in
    ``forward``, so it can be compiled or captured in a CUDA graph.
    """

    IN_CHANNELS = channels()

    def __init__(self, num_classes: int = 1, sizes: list[list[float]] | None = None,
                 ratios: list[float] | None = None, classes: list[str] | None = None,
                 image_size: int = 256, width: float = 1.0, fusion: bool = False) -> None:
        super().__init__()
        self.config = SSDConfig(
            num_classes=num_classes,
            sizes=[list(map(float, s)) for s in (sizes or SEED_SIZES)],
            ratios=[float(r) for r in (ratios or SEED_RATIOS)],
            classes=list(classes) if classes is not None else
            (["banana"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)]),
            width=float(width), fusion=bool(fusion))
        self.num_classes = num_classes
        num_anchors, chans = self.config.num_anchors, channels(self.config.width)
        for i in range(5):
            setattr(self, f"blk_{i}", get_blk(i, self.config.width))
            setattr(self, f"cls_{i}", cls_predictor(chans[i], num_anchors, num_classes))
            setattr(self, f"bbox_{i}", bbox_predictor(chans[i], num_anchors))
        if fusion:  # only then: the book's state dict keeps exactly its keys
            self.top_down = TopDown(chans)
        self._anchor_sizes = feature_map_sizes(image_size, image_size)
        self.register_buffer("anchors", self._make_anchors(self._anchor_sizes), persistent=False)

    @classmethod
    def from_config(cls, config: SSDConfig | dict[str, Any]) -> "TinySSD":
        cfg = config if isinstance(config, SSDConfig) else SSDConfig(**config)
        return cls(cfg.num_classes, cfg.sizes, cfg.ratios, cfg.classes, width=cfg.width, fusion=cfg.fusion)

    def _make_anchors(self, sizes: list[tuple[int, int]], device: torch.device | None = None) -> torch.Tensor:
        """``Tensor[1, A, 4]`` for feature maps of ``sizes`` (only their shapes matter)."""
        return torch.cat([multibox_prior(torch.empty(0, *hw, device=device), self.config.sizes[i],
                                         self.config.ratios) for i, hw in enumerate(sizes)], dim=1)

    def _anchors(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        if sizes == self._anchor_sizes:
            return self.anchors
        return self._make_anchors(sizes, feature_maps[0].device)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Without fusion each head runs right after its block, the book's order: backward then adds up
        # each map's gradients in the book's order, so training is bit for bit the book's.
        feature_maps: list[torch.Tensor] = []
        cls_preds, bbox_preds = [], []
        for i in range(5):
            X = getattr(self, f"blk_{i}")(X)
            feature_maps.append(X)
            if not self.config.fusion:
                cls_preds.append(getattr(self, f"cls_{i}")(X))
                bbox_preds.append(getattr(self, f"bbox_{i}")(X))
        if self.config.fusion:
            for i, fused in enumerate(self.top_down(feature_maps)):
                cls_preds.append(getattr(self, f"cls_{i}")(fused))
                bbox_preds.append(getattr(self, f"bbox_{i}")(fused))
        cls = concat_preds(cls_preds)
        return (self._anchors(feature_maps),
                cls.reshape(cls.shape[0], -1, self.num_classes + 1),
                concat_preds(bbox_preds))


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Write ``{"config", "model", **extra}`` atomically; loadable with ``weights_only=True``."""
    from ssd.util.files import atomic_torch_save

    net = unwrap(model)
    atomic_torch_save({"config": asdict(net.config), "model": net.state_dict(), **extra}, path)


class ModelFile(NamedTuple):
    """A model file's net and what the file records about how it was made."""
    net: "TinySSD"
    image_size: int | None   # the image size it was trained at (``params.data.image_size``), if recorded
    run_id: str | None       # the MLflow run that trained it (``mlflow_run_id``), if recorded
    recipe: str | None = None  # the ``train.recipe`` it was trained with, if recorded (None: before recipes)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> TinySSD:
    """Rebuild a TinySSD from a file written by :func:`save_model` (or a training checkpoint)."""
    return read_model(path, map_location).net


def read_model(path: str | Path, map_location: str | torch.device = "cpu", name: str | None = None) -> ModelFile:
    """A TinySSD and its recorded settings from a file written by :func:`save_model`.

    Loaded with ``weights_only=True`` (no pickled code runs). A file that is not a TinySSD (not a
    state dict, other keys or shapes, a bad config or image size) is a one-line ``ValueError``
    naming ``name`` (default: the path); a missing file ``FileNotFoundError``.
    """
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {name}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise ValueError(f"{name} is not a TinySSD model file: {_first_line(exc)}") from None
    if not isinstance(blob, dict) or "config" not in blob or "model" not in blob:
        raise ValueError(f"{name} is not a TinySSD model file (no 'config'/'model' entries)")
    try:
        net = TinySSD.from_config(blob["config"])
        net.load_state_dict(blob["model"])
    except Exception as exc:  # TypeError/ValueError from the config, RuntimeError from the state dict
        raise ValueError(f"{name} is not a TinySSD model file: {_state_dict_problem(exc)}") from None
    return ModelFile(net.to(map_location).eval(), _recorded_image_size(blob, name), _recorded_run(blob),
                     _recorded("train", "recipe", blob, name))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _state_dict_problem(exc: BaseException) -> str:
    """``load_state_dict``'s many-line report as one line: the first problem of each kind."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    problems = [line for line in lines[1:] if line.startswith(("Missing", "Unexpected", "size mismatch"))]
    return "; ".join(p[:160] for p in problems) or _first_line(exc)


def _recorded_image_size(blob: dict, name: str) -> int | None:
    """``params.data.image_size`` of the training that wrote ``blob``: the size its anchors and
    weights were fitted at."""
    return _recorded("data", "image_size", blob, name)


def _recorded(section: str, key: str, blob: dict, name: str) -> Any:
    """``params.<section>.<key>`` as the training that wrote ``blob`` recorded it, or None; a value
    that the params would refuse refuses the file."""
    from ssd.util.settings import SCHEMA

    params = blob.get("params")
    node = params.get(section) if isinstance(params, dict) else None
    value = node.get(key) if isinstance(node, dict) else None
    if value is None:
        return None
    check = SCHEMA[f"{section}.{key}"]
    if not check.ok(value):
        raise ValueError(f"{name}: recorded {section}.{key}={value!r}: expected {check.expected}")
    return value


def _recorded_run(blob: dict) -> str | None:
    run = blob.get("mlflow_run_id")
    return run if isinstance(run, str) and run else None


def unwrap(model: nn.Module) -> nn.Module:
    """The TinySSD inside DDP and/or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model
