"""Generated bananas: a stand-in for the d2l banana archive when the real one cannot be downloaded.

``generate_archive`` writes a zip with the real archive's layout::

    banana-detection/bananas_train/images/0.png ... label.csv
    banana-detection/bananas_val/images/0.png ...   label.csv

Each image is a varied background (gradients, value-noise textures, stripes, clutter and yellowish
distractors that are not banana-shaped) with 1..``max_objects`` objects pasted on it. Class
``banana`` is a shaded yellow crescent with brown tips, rotated and scaled so that its box matches
the real dataset's statistics (sides 32-75 px, aspect w/h 0.65-1.4); every other class is a round
fruit, drawn differently, so multi-class code paths have something to learn. Objects never overlap,
so each label box is the tight box of that object's drawn pixels.

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i)``, and zip
members carry a fixed timestamp, so one seed gives the same archive bytes.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ssd.data.layout import DATASET_DIR, IMAGES_DIR, LABEL_FILE, LABEL_HEADER, SPLIT_DIRS

# Box statistics of the real archive (see README "Data"): sides in pixels, aspect = width / height.
MIN_SIDE, MAX_SIDE = 32, 75
MIN_ASPECT, MAX_ASPECT = 0.65, 1.4
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same seed gives the same zip bytes


@dataclass
class Rendered:
    """One generated picture: ``image`` and ``under`` are ``uint8 [H, W, 3]``; ``under`` is the picture
    just before the objects were drawn, so ``image != under`` is exactly the objects' pixels.
    ``boxes`` rows are ``(class, xmin, ymin, xmax, ymax)`` in pixels, ``xmax``/``ymax`` exclusive."""
    image: np.ndarray
    under: np.ndarray
    boxes: list[tuple[int, int, int, int, int]]


# ----------------------------------------------------------------------------------------------
# backgrounds

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x / size, y / size


def _value_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Smooth random blotches ``float32 [size, size, channels]`` in [0, 1] (a bilinear-upsampled grid)."""
    small = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(small if channels == 3 else small[..., 0]).resize((size, size), Image.BICUBIC)
    out = np.asarray(img, dtype=np.float32) / 255.0
    return out if channels == 3 else out[..., None]


def _random_colour(rng: np.random.Generator, lo: float = 0.05, hi: float = 0.95) -> np.ndarray:
    return rng.uniform(lo, hi, 3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``float32 [size, size, 3]`` in [0, 1]: one of several families, mixed with noise."""
    x, y = _grid(size)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient between two colours
        angle = rng.uniform(0, 2 * np.pi)
        t = ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + 0.71) / 1.42
        a, b = _random_colour(rng), _random_colour(rng)
        img = a + (b - a) * t[..., None]
    elif kind == 1:  # blotchy texture
        img = _value_noise(rng, size, int(rng.integers(3, 12)))
        img = img * rng.uniform(0.4, 1.0) + _random_colour(rng, 0, 0.5) * 0.5
    elif kind == 2:  # stripes / wood grain, warped by noise
        angle = rng.uniform(0, np.pi)
        warp = _value_noise(rng, size, 4, 1)[..., 0]
        phase = ((x * np.cos(angle) + y * np.sin(angle)) * rng.uniform(4, 30) + warp * rng.uniform(0, 6))
        t = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
        a, b = _random_colour(rng), _random_colour(rng)
        img = a + (b - a) * t[..., None]
    else:  # radial vignette over a flat colour
        r = np.hypot(x - rng.uniform(0.2, 0.8), y - rng.uniform(0.2, 0.8))
        img = _random_colour(rng)[None, None] * (1.1 - rng.uniform(0.3, 0.9) * r[..., None])
    img = img + rng.normal(0, rng.uniform(0.002, 0.012), (size, size, 1)).astype(np.float32)
    return np.clip(img, 0, 1)


def _clutter(rng: np.random.Generator, img: Image.Image) -> None:
    """Random shapes, some yellowish (lemons, bars, blobs): distractors that are not crescents."""
    draw = ImageDraw.Draw(img)
    size = img.width
    for _ in range(int(rng.integers(0, 12))):
        yellow = rng.random() < 0.3
        if yellow:
            colour = tuple(int(c) for c in rng.uniform([190, 160, 0], [255, 230, 90]))
        else:
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-20, size, 2)
        w, h = rng.uniform(4, 70, 2)
        box = [x0, y0, x0 + w, y0 + h]
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        elif shape == 2:
            draw.line([(x0, y0), (x0 + rng.uniform(-80, 80), y0 + rng.uniform(-80, 80))], fill=colour,
                      width=int(rng.integers(1, 8)))
        else:
            pts = rng.uniform(-30, 30, (int(rng.integers(3, 7)), 2)) + [x0, y0]
            draw.polygon([tuple(p) for p in pts], fill=colour)


# ----------------------------------------------------------------------------------------------
# objects: each returns (mask bool [h, w], colour float32 [h, w, 3]) cropped to its tight box

def _tight(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The tight box of ``mask`` as slices, or None when its size is outside the real statistics."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    h, w = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE and MIN_ASPECT <= w / h <= MAX_ASPECT):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _banana(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """A crescent: an arc of radius ``R`` over ``[-theta, theta]``, thickest in the middle, tapering
    to brown tips, shaded across its width, rotated by a random angle. None if its box is off-size."""
    chord = rng.uniform(40, 80)
    theta = rng.uniform(0.45, 1.0)                   # half the arc's angle: how curved it is
    radius = chord / (2 * np.sin(theta))
    thick = chord * rng.uniform(0.22, 0.34)
    alpha = rng.uniform(0, 2 * np.pi)
    # Local frame: arc centre at the origin, arc around +y. The patch is centred on the arc's middle.
    mid = np.array([0.0, radius * (1 + np.cos(theta)) / 2])
    half = int(np.ceil(np.hypot(chord / 2 + thick, radius * (1 - np.cos(theta)) / 2 + thick))) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    ca, sa = np.cos(alpha), np.sin(alpha)
    u = ca * xx + sa * yy + mid[0]                  # inverse rotation into the local frame
    v = -sa * xx + ca * yy + mid[1]
    r = np.hypot(u, v)
    phi = np.arctan2(u, v) / theta                  # -1..1 along the banana
    t = thick / 2 * np.sqrt(np.clip(1 - phi ** 2, 0, 1)) ** 0.7 + 1.0
    across = (r - radius) / t                       # -1 (inner edge) .. 1 (outer edge)
    mask = (np.abs(phi) <= 1) & (np.abs(across) <= 1)
    box = _tight(mask)
    if box is None:  # rejected before the (costlier) colouring
        return None
    mask, phi, across = mask[box], phi[box], across[box]
    base = rng.uniform([0.85, 0.70, 0.05], [1.0, 0.90, 0.30]).astype(np.float32)
    shade = 0.55 + 0.45 * np.sqrt(np.clip(1 - (across - rng.uniform(-0.5, 0.5)) ** 2, 0, 1))
    shade = shade * (1 + 0.06 * rng.standard_normal(shade.shape).astype(np.float32))
    colour = base * shade[..., None]
    tip = np.clip((np.abs(phi) - rng.uniform(0.78, 0.9)) / 0.1, 0, 1)[..., None]  # brown tips
    colour = colour * (1 - tip) + np.array([0.35, 0.22, 0.08], np.float32) * tip
    ridge = np.exp(-((across + 0.6) / 0.12) ** 2)[..., None] * 0.25              # a darker ridge line
    colour = colour * (1 - ridge)
    return mask, np.clip(colour, 0, 1)


def _round_fruit(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A shaded ellipse with a highlight and a stem: the look of every class other than banana."""
    w, h = rng.uniform(34, 70), rng.uniform(34, 70)
    half = int(max(w, h)) // 2 + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    d = np.hypot(xx / (w / 2), yy / (h / 2))
    mask = d <= 1
    hue = np.array([[0.8, 0.1, 0.1], [0.95, 0.45, 0.05], [0.3, 0.7, 0.15], [0.5, 0.2, 0.6]],
                   np.float32)[(cls - 1) % 4]
    light = np.exp(-((xx + w * 0.2) ** 2 + (yy + h * 0.2) ** 2) / (0.02 * w * h))
    colour = hue * (1 - 0.45 * d)[..., None] + 0.5 * light[..., None]
    stem = (np.abs(xx) < 2) & (yy < -h / 2 + 6) & mask
    colour[stem] = [0.3, 0.2, 0.05]
    box = _tight(mask)
    return None if box is None else (mask[box], np.clip(colour[box], 0, 1))


def _object(rng: np.random.Generator, cls: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mask bool [h, w], colour float32 [h, w, 3])`` cropped to a box that fits the real statistics
    (rejection sampling: a few cheap tries on average)."""
    while True:
        drawn = _banana(rng) if name == "banana" else _round_fruit(rng, cls)
        if drawn is not None:
            return drawn


def render_image(rng: np.random.Generator, size: int = 256, classes: Sequence[str] = ("banana",),
                 max_objects: int = 1) -> Rendered:
    """One picture with 1..``max_objects`` non-overlapping objects of random classes."""
    img = Image.fromarray((_background(rng, size) * 255).astype(np.uint8))
    _clutter(rng, img)
    canvas = np.asarray(img, dtype=np.float32) / 255.0
    placed: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(len(classes)))
        mask, colour = _object(rng, cls, classes[cls])
        h, w = mask.shape
        for _try in range(30):  # a free spot, 4 px from other objects so shadows never touch them
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if all(x + w + 4 <= px or px + pm.shape[1] + 4 <= x or y + h + 4 <= py or py + pm.shape[0] + 4 <= y
                   for _c, px, py, pm, _col in placed):
                placed.append((cls, x, y, mask, colour))
                break
    if not placed:  # cannot happen for one object (it always fits); guards max_objects misuse
        raise RuntimeError("no object could be placed")
    for _cls, x, y, mask, _col in placed:  # soft drop shadows, under the objects
        dx, dy = 3, 3
        region = canvas[y + dy:y + dy + mask.shape[0], x + dx:x + dx + mask.shape[1]]
        m = mask[:region.shape[0], :region.shape[1]]
        region[m] *= 0.6
    under = np.round(canvas * 255).astype(np.uint8)
    boxes = []
    for cls, x, y, mask, colour in placed:
        region = canvas[y:y + mask.shape[0], x:x + mask.shape[1]]
        region[mask] = colour[mask]
        boxes.append((cls, x, y, x + mask.shape[1], y + mask.shape[0]))
    image = np.round(canvas * 255).astype(np.uint8)
    # An object pixel equal to the pixel below it would shrink the visible box: nudge it by one.
    for _cls, x, y, mask, _col in placed:
        sl = (slice(y, y + mask.shape[0]), slice(x, x + mask.shape[1]))
        same = mask & (image[sl] == under[sl]).all(-1)
        image[sl][same] = under[sl][same] ^ 1
    return Rendered(image, under, boxes)


# ----------------------------------------------------------------------------------------------
# the archive

def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _add(zf: zipfile.ZipFile, name: str, data: bytes, compress: int) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.compress_type = compress
    info.external_attr = (0o100000 | 0o644) << 16  # a regular file, rw-r--r--
    zf.writestr(info, data)


def generate_archive(path: str | Path, *, seed: int = 0, train: int = 1000, val: int = 100,
                     image_size: int = 256, max_objects: int = 1,
                     classes: Sequence[str] = ("banana",), progress: bool = False) -> dict[str, int]:
    """Write the zip to ``path``; returns the number of images per split."""
    classes = list(classes)
    if not classes or max_objects < 1 or train < 1 or val < 1 or image_size < 2 * MAX_SIDE:
        raise ValueError(f"synthetic data needs classes, max_objects >= 1, train/val >= 1 and "
                         f"image_size >= {2 * MAX_SIDE} (got classes={classes}, max_objects={max_objects}, "
                         f"train={train}, val={val}, image_size={image_size})")
    counts = {"train": train, "val": val}
    from tqdm import tqdm

    bar = tqdm(total=train + val, desc="generating bananas", unit="img", disable=not progress)
    with zipfile.ZipFile(path, "w") as zf:
        for split_no, (split, n) in enumerate(counts.items()):
            rows = [LABEL_HEADER]
            for i in range(n):
                rng = np.random.default_rng([seed, split_no, i])
                out = render_image(rng, image_size, classes, max_objects)
                _add(zf, f"{DATASET_DIR}/{SPLIT_DIRS[split]}/{IMAGES_DIR}/{i}.png", _png(out.image), zipfile.ZIP_STORED)
                rows += [f"{i}.png,{c},{x1},{y1},{x2},{y2}" for c, x1, y1, x2, y2 in out.boxes]
                bar.update()
            _add(zf, f"{DATASET_DIR}/{SPLIT_DIRS[split]}/{LABEL_FILE}", ("\n".join(rows) + "\n").encode(),
                 zipfile.ZIP_DEFLATED)
    bar.close()
    return counts
