"""The ``photos`` recipe's light top-down fusion of TinySSD's scales (``SSDConfig.fusion``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TopDown(nn.Module):
    """Light top-down fusion (as in feature pyramid networks, without their extra 3x3 convs): from
    the coarsest scale down, each map gets the fused map above it through a 1x1 conv, upsampled
    (nearest) to its size and added. Shapes in and out: the five ``Tensor[B, C_i, H_i, W_i]``."""

    def __init__(self, chans: list[int]) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(chans[i + 1], chans[i], kernel_size=1) for i in range(len(chans) - 1))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        out = list(maps)
        for i in range(len(maps) - 2, -1, -1):
            above = F.interpolate(self.lateral[i](out[i + 1]), size=maps[i].shape[-2:], mode="nearest")
            out[i] = maps[i] + above
        return out
