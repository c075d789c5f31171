"""Deterministic structured tasks in the spirit of VTAB's Structured group, drawn with PIL.

They exist so that offline users can test spatial reasoning, which no installable real data set
covers: the labels are exact because the images are generated from them. 64×64, fixed seed, the
same images on every machine (PIL drawing is deterministic).

- ``shapes-loc``  (like dSprites location): one white sprite (square, ellipse or triangle) of random
  scale and rotation on black; label = horizontal position of its centre in 8 bins.
- ``shapes-ori``  (like dSprites orientation): one white arrow-like sprite at a random position and
  scale; label = its rotation in 8 bins of 45°.
- ``clevr-count`` (like CLEVR count): 3–10 coloured discs and squares of varied size on a grey
  floor, without overlaps; label = number of objects − 3 (8 classes).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
N_TRAIN, N_TEST = 4000, 1000
SEED = {"shapes-loc": 11, "shapes-ori": 12, "clevr-count": 13}


def _polygon(cx, cy, r, angle, kind):
    if kind == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
               for k in range(4)]
    elif kind == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    else:  # arrow: a long isosceles triangle with a notch, no rotational symmetry
        pts = [(1.0, 0.0), (-0.7, 0.55), (-0.35, 0.0), (-0.7, -0.55)]
        pts = [(x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)) for x, y in pts]
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _shapes_loc(rng) -> tuple[np.ndarray, int]:
    img = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(5, 10)
    cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
    kind = ["square", "ellipse", "triangle"][rng.integers(3)]
    if kind == "ellipse":
        draw.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=255)
    else:
        draw.polygon(_polygon(cx, cy, r, rng.uniform(0, 2 * math.pi), kind), fill=255)
    label = min(7, int((cx - r) / (SIZE - 2 * r) * 8))
    return np.asarray(img), label


def _shapes_ori(rng) -> tuple[np.ndarray, int]:
    img = Image.new("L", (SIZE, SIZE), 0)
    r = rng.uniform(10, 16)
    cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
    label = int(rng.integers(8))
    angle = (label + rng.uniform(0.1, 0.9)) * math.pi / 4  # inside the bin, away from its edges
    ImageDraw.Draw(img).polygon(_polygon(cx, cy, r, angle, "arrow"), fill=255)
    return np.asarray(img), label


def _clevr_count(rng) -> tuple[np.ndarray, int]:
    img = Image.new("RGB", (SIZE, SIZE), (118, 118, 118))
    draw = ImageDraw.Draw(img)
    count = int(rng.integers(3, 11))
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.uniform(3, 6)
        cx, cy = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
        if any(math.hypot(cx - x, cy - y) < (r + q) * math.sqrt(2) + 1.5 for x, y, q in placed):  # square corners
            continue
        placed.append((cx, cy, r))
        color = tuple(int(c) for c in rng.integers(30, 256, 3))
        box = [cx - r, cy - r, cx + r, cy + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return np.asarray(img), count - 3


CLASSES = {
    "shapes-loc": [f"x-bin-{i}" for i in range(8)],
    "shapes-ori": [f"{45 * i}-{45 * (i + 1)}deg" for i in range(8)],
    "clevr-count": [str(n) for n in range(3, 11)],
}
_DRAW = {"shapes-loc": _shapes_loc, "shapes-ori": _shapes_ori, "clevr-count": _clevr_count}


@functools.lru_cache(maxsize=None)
def generate(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels), the same on every call and machine."""
    rng = np.random.default_rng(SEED[name])
    images, labels = zip(*(_DRAW[name](rng) for _ in range(N_TRAIN + N_TEST)))
    x, y = np.stack(images), np.asarray(labels, dtype=np.int64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def load_synthetic(name: str) -> dict:
    from .datasets import ArrayDataset

    x_train, y_train, x_test, y_test = generate(name)
    return {"class_names": CLASSES[name], "train": ArrayDataset(x_train, y_train), "val": None,
            "test": ArrayDataset(x_test, y_test)}
