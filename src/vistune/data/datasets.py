"""Datasets (files on disk or uint8 arrays in memory), stratified splits, and the folder / list-file readers
(``load_data``, in ``loading``, puts them together)."""
from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import VistuneError
from .images import is_image_file, load_image

SPLIT_NAMES = ("train", "val", "test")
LIST_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")


# ---------------------------------------------------------------------------------------------- datasets
class ImageDataset(Dataset, abc.ABC):
    """Items are ``(transform(rgb_pil_image), int_label)``; ``labels`` is an int64 array, one per item."""

    labels: np.ndarray
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def image(self, i: int) -> Image.Image:
        """The i-th image, RGB."""

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        img = self.image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])

    @abc.abstractmethod
    def subset(self, indices, transform: Callable | None = None) -> ImageDataset:
        """A dataset of the given items (sharing the underlying data), with ``transform``."""

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

    def __getstate__(self):
        state = dict(self.__dict__)
        if len(self.indices) < len(self.images):  # pickle (e.g. to spawned workers) only this subset's images
            state.update(images=self.images[self.indices], all_labels=self.labels,
                         indices=np.arange(len(self.indices)))
        return state

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
        frac = np.where(cap > alloc, share - np.floor(share), -1.0)
        order = np.lexsort((np.arange(len(counts)), -frac))  # largest remainder first, ties by class index
        for c in order[: min(remaining, int((frac >= 0).sum()))]:
            alloc[c] += 1
        remaining = n - int(alloc.sum())
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
FileKey = tuple[int, int]  # (st_dev, st_ino): one file however many paths (symbolic or hard links) reach it


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class FolderWalk:
    """What :func:`walk_images` found below one folder."""

    files: list[tuple[str, FileKey]]  # (path, file key), sorted by path, each file once
    repeats: list[str]  # paths passed over: files or folders already reached by another path (links, loops)
    broken: list[str]  # image names whose symbolic link leads nowhere (or that cannot be stat'ed)


def walk_images(folder: Path) -> FolderWalk:
    """Image files below ``folder`` (recursively, following symbolic links), skipping hidden files and folders.

    Every folder is entered once and every file listed once, under the first path a sorted top-down walk
    reaches it by: a link back up the tree (a loop) or a second link to the same folder or image is passed
    over, not followed again. A link to an image or folder outside ``folder`` is followed (once)."""
    try:
        st = os.stat(folder)
    except OSError:
        return FolderWalk([], [], [])
    seen_dirs = {(st.st_dev, st.st_ino)}
    found: list[tuple[str, FileKey]] = []
    repeats: list[str] = []
    broken: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            try:
                st = os.stat(os.path.join(root, d))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                repeats.append(os.path.join(root, d))
            else:
                seen_dirs.add(key)
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if is_image_file(f):
                path = os.path.join(root, f)
                try:
                    st = os.stat(path)
                except OSError:
                    broken.append(path)
                    continue
                found.append((path, (st.st_dev, st.st_ino)))
    found.sort()
    seen_files: set[FileKey] = set()
    files_once = []
    for path, key in found:
        if key in seen_files:
            repeats.append(path)
        else:
            seen_files.add(key)
            files_once.append((path, key))
    return FolderWalk(files_once, sorted(repeats), broken)


def images_under(folder: Path) -> list[str]:
    """The image files below ``folder`` (see :func:`walk_images`), sorted."""
    return [path for path, _ in walk_images(folder).files]


_EXTS_TEXT = "jpg, jpeg, png, bmp, gif, webp, tif, tiff"


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def read_class_folders(split_dir: Path, class_names: list[str] | None = None,
                       notes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """Read ``split_dir/<class>/*``; returns (class_names, paths, labels).

    With ``class_names`` given (train's), a class folder unknown to it is an error; a missing one is fine.
    Each image file is read once (see :func:`walk_images`); one file in two class folders is an error.
    ``notes``: a list that receives a sentence about paths passed over as repeats, if any."""
    class_dirs = visible_dirs(split_dir)
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
    owner: dict[FileKey, str] = {}  # file → the first path (and so class folder) it was found under
    conflicts: list[str] = []
    repeats: list[str] = []
    for d in class_dirs:
        walk = walk_images(d)
        if walk.broken:
            raise VistuneError(f"{d} holds {len(walk.broken)} symbolic link(s) to images that do not exist: "
                               f"{_examples(walk.broken)}",
                               "remove those links or point them at existing images")
        if not walk.files:
            raise VistuneError(f"class folder {d} holds no images (looked for {_EXTS_TEXT})",
                               "add images to it, or remove the empty folder")
        repeats += walk.repeats
        for path, key in walk.files:
            if key in owner:
                conflicts.append(f"{owner[key]} and {path}")
                continue
            owner[key] = path
            paths.append(path)
            labels.append(index[d.name])
    if conflicts:
        raise VistuneError(f"{split_dir}: {len(conflicts)} image file(s) are in two class folders at once "
                           f"(the same file through a symbolic or hard link): {_examples(conflicts)}",
                           "an image has one class: remove the link from the class folder it does not belong to")
    if repeats and notes is not None:
        notes.append(f"{split_dir}: {len(repeats)} path(s) lead to folders or images already read (symbolic or "
                     f"hard links, e.g. a link back up the tree), each image is read once: {_examples(repeats)}")
    return class_names, paths, labels


def read_folder(root: Path) -> dict:
    """Form 1: ``root/train/<class>/*`` with optional ``val/`` and ``test/``."""
    notes: list[str] = []
    class_names, paths, labels = read_class_folders(root / "train", notes=notes)
    out = {"class_names": class_names, "train": FileDataset(paths, labels), "val": None, "test": None,
           "val_missing": f"no {root / 'val'} folder", "warnings": notes}
    for split in ("val", "test"):
        d = root / split
        if d.is_dir():
            _, p, l = read_class_folders(d, class_names, notes=notes)
            out[split] = FileDataset(p, l)
    return out


# --------------------------------------------------------------------------------------- list-file form
def _outside_root(rel: str) -> bool:
    """True for an absolute path or one whose ``..`` parts climb above the list file's folder."""
    return Path(rel).is_absolute() or os.path.normpath(rel).split(os.sep)[0] == os.pardir


def _read_list(root: Path, list_path: Path) -> tuple[list[str], list[int], list[int]]:
    """Lines ``relative/path label`` (the label is the last whitespace-separated token).

    Paths are relative to ``root``, and must stay inside it: an absolute path or one climbing out with
    ``..`` is an error (a list file then reads only the folder it came with; images stored elsewhere are
    reached through a symbolic link inside ``root``). Returns paths, labels and the line number of each
    entry (for error messages)."""
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
        if _outside_root(rel):
            kind = "is absolute" if Path(rel).is_absolute() else "climbs out with '..'"
            raise VistuneError(
                f"{list_path}, line {no}: image path {rel!r} {kind}: list files may only name images inside "
                f"{root}",
                f"write the path relative to {root}; for images stored elsewhere, put a symbolic link to their "
                f"folder inside {root} (e.g. ln -s /data/images {root / 'images'}) and list them through it",
            )
        full = root / rel
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
    notes: list[str] = []
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
            notes.append(f"labels in {root} run 0..{num - 1} but no image has label(s) "
                         f"{', '.join(map(str, missing[:10]))}{'…' if len(missing) > 10 else ''}")

    def ds(name):
        paths, labels, _ = lists[name]
        return FileDataset(paths, labels)

    out = {"class_names": class_names, "val": None, "test": ds("test.txt") if "test.txt" in lists else None,
           "final_train": None, "val_missing": f"no {root / 'val200.txt'}", "warnings": notes}
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
