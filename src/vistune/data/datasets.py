"""Datasets (files on disk or uint8 arrays in memory), stratified splits, and the folder / list-file readers."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import VistuneError
from .images import is_image_file, load_image

SPLIT_NAMES = ("train", "val", "test")
LIST_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")


# ---------------------------------------------------------------------------------------------- datasets
class ImageDataset(Dataset):
    """Items are ``(transform(rgb_pil_image), int_label)``; ``labels`` is an int64 array, one per item."""

    labels: np.ndarray
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        img = self.image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    def subset(self, indices, transform: Callable | None = None) -> ImageDataset:
        raise NotImplementedError

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        return self.subset(np.arange(len(self)), transform)


class FileDataset(ImageDataset):
    """Images read from files on each access (decoded with :func:`load_image`)."""

    def __init__(self, paths: Sequence[str], labels, transform: Callable | None = None):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")
        self.transform = transform

    def image(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def subset(self, indices, transform: Callable | None = None) -> FileDataset:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return FileDataset([self.paths[j] for j in idx], self.labels[idx], transform)

    def __repr__(self) -> str:
        return f"FileDataset({len(self)} images)"


class ArrayDataset(ImageDataset):
    """Images held in memory as uint8 ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB); subsets share the array."""

    def __init__(self, images: np.ndarray, labels, transform: Callable | None = None, indices=None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"images must be uint8 (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}")
        self.images = images
        self.all_labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.all_labels) != len(images):
            raise ValueError("images and labels differ in length")
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        self.labels = self.all_labels[self.indices]
        self.transform = transform

    def image(self, i: int) -> Image.Image:
        a = self.images[self.indices[i]]
        if a.ndim == 2:
            return Image.fromarray(a, "L").convert("RGB")
        return Image.fromarray(np.ascontiguousarray(a), "RGB")

    def subset(self, indices, transform: Callable | None = None) -> ArrayDataset:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ArrayDataset(self.images, self.all_labels, transform, indices=self.indices[idx])

    def __repr__(self) -> str:
        return f"ArrayDataset({len(self)} images of {self.images.shape[1:]})"


def concat(a: ImageDataset, b: ImageDataset, transform: Callable | None) -> ImageDataset:
    """All items of ``a`` then of ``b`` (duplicates kept), with ``transform``."""
    if isinstance(a, FileDataset) and isinstance(b, FileDataset):
        return FileDataset(a.paths + b.paths, np.concatenate([a.labels, b.labels]), transform)
    if isinstance(a, ArrayDataset) and isinstance(b, ArrayDataset):
        if a.images is b.images:
            return ArrayDataset(a.images, a.all_labels, transform, np.concatenate([a.indices, b.indices]))
        if a.images.shape[1:] == b.images.shape[1:]:
            return ArrayDataset(np.concatenate([a.images[a.indices], b.images[b.indices]]),
                                np.concatenate([a.labels, b.labels]), transform)
    raise TypeError(f"cannot concatenate {a!r} and {b!r}")


# ------------------------------------------------------------------------------------ stratified splits
def _allocate(counts: np.ndarray, n: int, cap: np.ndarray) -> np.ndarray:
    """How many of ``n`` to draw from each class: proportional to ``counts``, at most ``cap``,
    and at least one from every class that can give one when ``n`` allows it."""
    counts = np.asarray(counts, dtype=np.int64)
    cap = np.minimum(np.asarray(cap, dtype=np.int64), counts)
    if n > cap.sum():
        raise ValueError("n exceeds what the classes can give")
    alloc = np.zeros_like(counts)
    eligible = cap > 0
    if n >= eligible.sum():
        alloc[eligible] = 1
    quota = n * counts / max(int(counts.sum()), 1)
    remaining = n - int(alloc.sum())
    while remaining > 0:
        room = cap - alloc
        open_ = room > 0
        # proportional share of what is left among classes with room, then largest remainders
        deficit = np.where(open_, np.maximum(quota - alloc, 0.0), 0.0)
        if deficit.sum() <= 0:
            deficit = np.where(open_, counts.astype(float), 0.0)
        share = remaining * deficit / deficit.sum()
        add = np.minimum(np.floor(share).astype(np.int64), room)
        alloc += add
        remaining -= int(add.sum())
        if remaining <= 0:
            break
        frac = np.where(cap - alloc > 0, share - np.floor(share), -1.0)
        order = np.lexsort((np.arange(len(counts)), -frac))  # largest remainder first, ties by class index
        for c in order:
            if remaining == 0 or cap[c] - alloc[c] <= 0:
                continue
            if frac[c] < 0:
                continue
            alloc[c] += 1
            remaining -= 1
    return alloc


def stratified_pick(labels, n: int, seed: int, *, keep_one: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` indices stratified by label (fixed by ``seed``); returns ``(picked, rest)``, each sorted.

    ``keep_one``: leave at least one image of every class in ``rest`` (when splitting val off train)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    num = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=num)
    cap = np.maximum(counts - 1, 0) if keep_one else counts
    alloc = _allocate(counts, n, cap)
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num):
        members = np.flatnonzero(labels == c)
        if len(members):
            perm = rng.permutation(len(members))
            picked.append(members[perm[: alloc[c]]])
    picked_idx = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[picked_idx] = False
    return picked_idx, np.flatnonzero(mask)


# ------------------------------------------------------------------------------------------ folder form
def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursively), skipping hidden files and folders; sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in files if is_image_file(f))
    return sorted(found)


_EXTS_TEXT = "jpg, jpeg, png, bmp, gif, webp, tif, tiff"


def read_class_folders(split_dir: Path, class_names: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """Read ``split_dir/<class>/*``; returns (class_names, paths, labels).

    With ``class_names`` given (train's), a class folder unknown to it is an error; a missing one is fine."""
    class_dirs = _visible_dirs(split_dir)
    if not class_dirs:
        loose = [p.name for p in split_dir.iterdir() if p.is_file() and is_image_file(p.name)]
        hint = (f" (it holds {len(loose)} loose images: move them into one sub-folder per class)" if loose else "")
        raise VistuneError(f"{split_dir} has no class folders{hint}",
                           f"put the images of each class in their own folder: {split_dir}/<class name>/<image>")
    names = [d.name for d in class_dirs]
    if class_names is None:
        class_names = names
    else:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise VistuneError(
                f"{split_dir} has class folder(s) that train does not have: {', '.join(unknown)}; "
                f"train's classes are: {', '.join(class_names)}",
                f"rename or remove those folders in {split_dir}, or add them to train",
            )
    index = {n: i for i, n in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int] = []
    for d in class_dirs:
        files = _images_under(d)
        if not files:
            raise VistuneError(f"class folder {d} holds no images (looked for {_EXTS_TEXT})",
                               "add images to it, or remove the empty folder")
        paths += files
        labels += [index[d.name]] * len(files)
    return class_names, paths, labels


def read_folder(root: Path) -> dict:
    """Form 1: ``root/train/<class>/*`` with optional ``val/`` and ``test/``."""
    class_names, paths, labels = read_class_folders(root / "train")
    out = {"class_names": class_names, "train": FileDataset(paths, labels), "val": None, "test": None}
    for split in ("val", "test"):
        d = root / split
        if d.is_dir():
            _, p, l = read_class_folders(d, class_names)
            out[split] = FileDataset(p, l)
    return out


# --------------------------------------------------------------------------------------- list-file form
def _read_list(root: Path, list_path: Path) -> tuple[list[str], list[int], list[int]]:
    """Lines ``relative/path label`` (the label is the last whitespace-separated token).

    Returns paths, labels and the line number of each entry (for error messages)."""
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise VistuneError(f"{list_path} is not UTF-8 text ({e})", "save the list file as UTF-8") from e
    except OSError as e:
        raise VistuneError(f"cannot read list file {list_path}: {e.strerror or e}", "check that it exists") from e
    paths, labels, lines = [], [], []
    fmt = "each line must be '<relative/path/to/image> <integer label>'"
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise VistuneError(f"{list_path}, line {no}: expected an image path and a label, got {line!r}", fmt)
        rel, tok = parts
        try:
            label = int(tok)
        except ValueError:
            raise VistuneError(f"{list_path}, line {no}: label {tok!r} is not an integer", fmt) from None
        if label < 0:
            raise VistuneError(f"{list_path}, line {no}: label {label} is negative",
                               "labels must be 0..C-1 (line i of classes.txt names label i)")
        p = Path(rel)
        full = p if p.is_absolute() else root / p
        if not full.is_file():
            raise VistuneError(f"{list_path}, line {no}: image {full} does not exist",
                               f"fix the path (it is relative to {root}) or remove the line")
        paths.append(str(full))
        labels.append(label)
        lines.append(no)
    if not paths:
        raise VistuneError(f"list file {list_path} lists no images", fmt)
    return paths, labels, lines


def _read_classes_txt(path: Path) -> list[str]:
    names = path.read_text(encoding="utf-8-sig").splitlines()
    names = [n.strip() for n in names]
    while names and not names[-1]:
        names.pop()
    for i, n in enumerate(names):
        if not n:
            raise VistuneError(f"{path}, line {i + 1}: empty class name",
                               "write one class name per line: line i names label i (counting from 0)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VistuneError(f"{path} names these classes more than once: {', '.join(dup)}",
                           "give every class a distinct name")
    if not names:
        raise VistuneError(f"{path} is empty", "write one class name per line: line i names label i")
    return names


def read_list_folder(root: Path, protocol: str) -> dict:
    """Form 2 (NOAH / VTAB-1k): train800.txt, val200.txt, train800val200.txt, test.txt, optional classes.txt."""
    lists = {name: _read_list(root, root / name) for name in LIST_FILES if (root / name).is_file()}
    if "train800.txt" not in lists and "train800val200.txt" not in lists:
        raise VistuneError(f"{root} has no train800.txt or train800val200.txt",
                           "add a training list file (lines '<relative/path> <label>')")
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        class_names = _read_classes_txt(classes_txt)
        for name, (_, labels, lines) in lists.items():
            for label, no in zip(labels, lines):
                if label >= len(class_names):
                    raise VistuneError(
                        f"{root / name}, line {no}: label {label} is out of range: {classes_txt} names "
                        f"{len(class_names)} classes (labels 0..{len(class_names) - 1})",
                        f"fix the label, or add the missing class names to {classes_txt}",
                    )
    else:
        num = 1 + max(max(labels) for _, labels, _ in lists.values())
        class_names = [str(i) for i in range(num)]
        seen = set().union(*(set(labels) for _, labels, _ in lists.values()))
        missing = [i for i in range(num) if i not in seen]
        if missing:
            warnings.warn(f"labels in {root} run 0..{num - 1} but no image has label(s) "
                          f"{', '.join(map(str, missing[:10]))}{'…' if len(missing) > 10 else ''}", stacklevel=3)

    def ds(name):
        paths, labels, _ = lists[name]
        return FileDataset(paths, labels)

    out = {"class_names": class_names, "val": None, "test": ds("test.txt") if "test.txt" in lists else None,
           "final_train": None}
    has_train, has_val, has_tv = ("train800.txt" in lists, "val200.txt" in lists, "train800val200.txt" in lists)
    if has_train:
        out["train"] = ds("train800.txt")
        out["val"] = ds("val200.txt") if has_val else None
    elif has_val:  # train800val200 + val200: train = the 1000 minus the 200
        val_paths = set(lists["val200.txt"][0])
        tv = ds("train800val200.txt")
        keep = [i for i, p in enumerate(tv.paths) if p not in val_paths]
        out["train"], out["val"] = tv.subset(keep), ds("val200.txt")
    else:  # only train800val200: val is split off it
        out["train"] = ds("train800val200.txt")
    if protocol == "final" and has_tv and out["val"] is not None:
        out["final_train"] = ds("train800val200.txt")
    return out
