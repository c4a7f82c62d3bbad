"""The SSD paper's training augmentation, batch-wise on the training device (opt-in: ``train.augment``).

Liu et al., "SSD: Single Shot MultiBox Detector" (2016), section 2.2 "Data augmentation": photometric
distortion, a random patch whose IoU with some object is at least a minimum drawn from
{none (the whole image), 0.1, 0.3, 0.5, 0.7, 0.9} (patch side 0.3..1 of the image's, aspect ratio
0.5..2; boxes whose centre falls outside the patch are dropped, the others clipped to it), resized
back to the input size, and a horizontal flip with probability 0.5. (The paper's later "zoom out"
expansion is not here.)

Every function is pure: it takes ``images uint8 Tensor[B, 3, S, S]`` and ``labels float Tensor[B, M, 5]``
rows ``(class, x1, y1, x2, y2)`` normalised to [0, 1] (class < 0 is padding), returns new tensors of
the same shapes and dtypes on the same device, and draws every random number from the
``torch.Generator`` it is given (on that device), so a seed fixes the result. A label row dropped
by the crop becomes a padding row (all -1); padding rows stay padding.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["hflip", "random_hflip", "photometric_distort", "random_crop", "ssd_augment", "epoch_generator",
           "zoom_out", "mosaic", "photos_augment"]

MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9)  # None: keep the whole image
CROP_TRIALS = 50  # patches tried per image, as in the SSD reference code; none fitting keeps the image


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _coin(shape: Sequence[int], p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device) < p


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded by ``(seed, epoch, rank)``: an epoch's augmentation does not
    depend on the epochs before it, so a resumed run draws what an uninterrupted one would."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)


def hflip(images: torch.Tensor, labels: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the images where ``flip bool Tensor[B]`` is True, boxes with them: ``(images, labels)``."""
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    boxes = labels[..., 1:]
    mirrored = torch.stack((1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]), dim=-1)
    move = flip[:, None] & (labels[..., 0] >= 0)
    labels = torch.cat((labels[..., :1], torch.where(move[..., None], mirrored, boxes)), dim=-1)
    return images, labels


def random_hflip(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hflip` of each image with probability ``p``."""
    return hflip(images, labels, _coin((len(images),), p, generator))


# ITU-R BT.601 luma and the YIQ chroma axes: hue is a rotation of (I, Q), saturation scales them.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def photometric_distort(images: torch.Tensor, generator: torch.Generator, *, brightness: float = 32.0,
                        contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                        hue_degrees: float = 18.0, p: float = 0.5) -> torch.Tensor:
    """The SSD reference code's colour jitter, each part applied to an image with probability ``p``:
    brightness ``+ U(-32, 32)``, contrast ``* U(0.5, 1.5)``, saturation ``* U(0.5, 1.5)``, hue
    ``+ U(-18, 18)`` degrees. ``uint8 Tensor[B, 3, S, S]`` -> ``uint8 Tensor[B, 3, S, S]`` (boxes unchanged).
    """
    b = len(images)
    x = images.float()
    delta = torch.where(_coin((b,), p, generator), _uniform((b,), -brightness, brightness, generator), 0.0)
    alpha = torch.where(_coin((b,), p, generator), _uniform((b,), *contrast, generator), 1.0)
    x = (x + delta[:, None, None, None]).clamp(0, 255) * alpha[:, None, None, None]
    sat = torch.where(_coin((b,), p, generator), _uniform((b,), *saturation, generator), 1.0)
    angle = torch.where(_coin((b,), p, generator), _uniform((b,), -hue_degrees, hue_degrees, generator), 0.0)
    angle = angle * (math.pi / 180)
    cos, sin = torch.cos(angle) * sat, torch.sin(angle) * sat
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    # Per image: YIQ, rotate and scale the chroma plane, back to RGB; one 3x3 matrix each.
    chroma = torch.stack((torch.stack((one, zero, zero), -1), torch.stack((zero, cos, -sin), -1),
                          torch.stack((zero, sin, cos), -1)), -2)  # [B, 3, 3]
    to_yiq = _RGB_TO_YIQ.to(x.device)
    matrix = torch.linalg.inv(to_yiq) @ chroma @ to_yiq
    x = torch.einsum("bij,bjhw->bihw", matrix, x.clamp(0, 255))
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _paired_iou(patches: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of each image's patches ``Tensor[B, T, 4]`` with its own boxes ``Tensor[B, M, 4]``: ``Tensor[B, T, M]``."""
    lt = torch.maximum(patches[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(patches[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_p = (patches[..., 2:] - patches[..., :2]).prod(-1)
    area_b = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_p[:, :, None] + area_b[:, None, :] - inter)


def _sample_patches(labels: torch.Tensor, generator: torch.Generator, min_ious: Sequence[float | None],
                    trials: int) -> torch.Tensor:
    """One patch per image, ``Tensor[B, 4]`` corners in [0, 1]; ``(0, 0, 1, 1)`` where none fits."""
    b, device = len(labels), labels.device
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).expand(b, 4)
    # min IoU per image; "none" (keep the whole image) encoded as +inf so no patch satisfies it.
    choices = torch.tensor([math.inf if m is None else float(m) for m in min_ious], device=device)
    min_iou = choices[torch.randint(len(choices), (b,), generator=generator, device=device)]
    w = _uniform((b, trials), 0.3, 1.0, generator)
    h = _uniform((b, trials), 0.3, 1.0, generator)
    x1 = _uniform((b, trials), 0.0, 1.0, generator) * (1 - w)
    y1 = _uniform((b, trials), 0.0, 1.0, generator) * (1 - h)
    patches = torch.stack((x1, y1, x1 + w, y1 + h), dim=-1)  # [B, T, 4]
    boxes, valid = labels[..., 1:].to(patches.dtype), labels[..., 0] >= 0
    iou = _paired_iou(patches, boxes)  # [B, T, M]
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, M, 2]
    inside = ((centres[:, None] > patches[..., None, :2]) & (centres[:, None] < patches[..., None, 2:])).all(-1)
    aspect_ok = ((w / h) >= 0.5) & ((w / h) <= 2.0)
    fits = (((iou >= min_iou[:, None, None]) & valid[:, None]).any(-1)
            & (inside & valid[:, None]).any(-1) & aspect_ok)  # [B, T]
    first = fits.to(torch.int8).argmax(dim=1)
    chosen = patches[torch.arange(b, device=device), first]
    return torch.where(fits.any(dim=1)[:, None], chosen, whole)


def crop(images: torch.Tensor, labels: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``patches Tensor[B, 4]`` (corners in [0, 1]) out of the images and resize each back to
    ``S x S`` (bilinear); boxes follow: those whose centre is outside the patch become padding, the
    others are clipped to it. A patch ``(0, 0, 1, 1)`` returns its image and labels unchanged."""
    b, _, height, width = images.shape
    x1, y1, x2, y2 = patches.unbind(-1)
    zero = torch.zeros_like(x1)
    # affine_grid maps output coords in [-1, 1] to input coords: u -> (x2 - x1) u + (x1 + x2 - 1).
    theta = torch.stack((torch.stack((x2 - x1, zero, x1 + x2 - 1), -1),
                         torch.stack((zero, y2 - y1, y1 + y2 - 1), -1)), -2)
    grid = F.affine_grid(theta.float(), [b, 3, height, width], align_corners=False)
    resized = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    whole = (patches == torch.tensor([0.0, 0.0, 1.0, 1.0], device=patches.device)).all(-1)
    out_images = torch.where(whole[:, None, None, None], images,
                             resized.round_().clamp_(0, 255).to(torch.uint8))

    boxes = labels[..., 1:]
    origin = torch.cat((patches[:, None, :2], patches[:, None, :2]), -1)
    scale = torch.cat((patches[:, None, 2:] - patches[:, None, :2],) * 2, -1)
    moved = ((boxes - origin) / scale).clamp(0, 1).to(labels.dtype)
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2
    keep = (labels[..., 0] >= 0) & ((centres > patches[:, None, :2]) & (centres < patches[:, None, 2:])).all(-1)
    keep |= whole[:, None] & (labels[..., 0] >= 0)  # the whole image keeps every box as it was
    moved = torch.where(whole[:, None, None], boxes, moved)
    out_labels = torch.where(keep[..., None], torch.cat((labels[..., :1], moved), -1), -1.0)
    return out_images, out_labels


def random_crop(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                min_ious: Sequence[float | None] = MIN_IOUS, trials: int = CROP_TRIALS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD patch sampling: per image a minimum IoU from ``min_ious`` (None keeps the image), then
    the first of ``trials`` random patches that has IoU >= it with some box, some box centre inside
    and aspect ratio in [0.5, 2]; no such patch keeps the image. See :func:`crop`."""
    return crop(images, labels, _sample_patches(labels, generator, min_ious, trials))


def ssd_augment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole recipe in the paper's order: photometric distortion, random crop, horizontal flip."""
    images = photometric_distort(images, generator)
    images, labels = random_crop(images, labels, generator)
    return random_hflip(images, labels, generator)


def zoom_out(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, max_scale: float = 2.0,
             p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD paper's "zoom out" (its expansion step), with probability ``p`` per image: the image is
    placed at a random spot of a canvas ``U(1, max_scale)`` times its side, filled with the batch's mean
    colour, and the canvas resized back to ``S x S``; boxes shrink with it (none is dropped)."""
    b, _, height, width = images.shape
    side = torch.where(_coin((b,), p, generator), _uniform((b,), 1.0, max_scale, generator), 1.0)
    x1 = -_uniform((b,), 0.0, 1.0, generator) * (side - 1)
    y1 = -_uniform((b,), 0.0, 1.0, generator) * (side - 1)
    patches = torch.stack((x1, y1, x1 + side, y1 + side), -1)  # in image units: it encloses the image
    zero = torch.zeros_like(x1)
    theta = torch.stack((torch.stack((side, zero, 2 * x1 + side - 1), -1),
                         torch.stack((zero, side, 2 * y1 + side - 1), -1)), -2)
    grid = F.affine_grid(theta.float(), [b, 3, height, width], align_corners=False)
    mean = images.float().mean(dim=(0, 2, 3), keepdim=True)
    canvas = F.grid_sample(images.float() - mean, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = torch.where((side > 1)[:, None, None, None], (canvas + mean).round_().clamp_(0, 255).to(torch.uint8), images)
    origin = torch.cat((patches[:, None, :2],) * 2, -1)
    moved = ((labels[..., 1:] - origin) / side[:, None, None]).to(labels.dtype)
    return out, torch.where((labels[..., :1] >= 0), torch.cat((labels[..., :1], moved), -1), labels)


def mosaic(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
           p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``p`` per image, a 2 x 2 mosaic of it and three other images of the batch, each
    at half size; the labels become ``Tensor[B, 4 M, 5]`` (the four images' boxes, halved and moved;
    an image left alone keeps its rows, then padding)."""
    b, _, height, width = images.shape
    use = _coin((b,), p, generator)
    others = [torch.randint(b, (b,), generator=generator, device=generator.device) for _ in range(3)]
    sources = [torch.arange(b, device=images.device), *others]
    small = F.interpolate(images.float(), scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    top = torch.cat((small[sources[0]], small[sources[1]]), dim=-1)
    bottom = torch.cat((small[sources[2]], small[sources[3]]), dim=-1)
    tiled = F.interpolate(torch.cat((top, bottom), dim=-2), size=(height, width), mode="nearest")
    out = torch.where(use[:, None, None, None], tiled.round_().clamp_(0, 255).to(torch.uint8), images)
    rows = []
    for k, source in enumerate(sources):
        part = labels[source]
        offset = torch.tensor([(k % 2) * 0.5, (k // 2) * 0.5] * 2, device=labels.device, dtype=labels.dtype)
        moved = torch.cat((part[..., :1], part[..., 1:] * 0.5 + offset), -1)
        rows.append(torch.where(part[..., :1] >= 0, moved, part))
    tiled_labels = torch.cat(rows, dim=1)
    alone = torch.cat((labels, torch.full_like(labels, -1.0).repeat(1, 3, 1)), dim=1)
    return out, torch.where(use[:, None, None], tiled_labels, alone)


def photos_augment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``photos`` recipe's: :func:`mosaic`, photometric distortion, :func:`zoom_out`, the SSD random
    crop and the horizontal flip."""
    images, labels = mosaic(images, labels, generator)
    images = photometric_distort(images, generator)
    images, labels = zoom_out(images, labels, generator)
    images, labels = random_crop(images, labels, generator)
    return random_hflip(images, labels, generator)
