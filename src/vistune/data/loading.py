"""``load_data``: a ``--data`` spec (folder, list-file folder, built-in name, tarball) → :class:`DataSplits`,
with what a user should know about the splits: where val came from, classes a split lacks, shared files.

Above ``datasets`` (the readers) and ``builtin`` (the offline sets), so neither imports the other's caller."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import VistuneError, suggest
from .builtin import BUILTIN_DATASETS, load_builtin, read_image_tarball
from .datasets import (LIST_FILES, FileDataset, ImageDataset, concat, images_under, read_folder, read_list_folder,
                       stratified_pick, visible_dirs)

PROTOCOLS = ("train-val", "final")
SPLITS = ("train", "val", "test")
DEFAULT_DATA_SEED = 0
_LISTED_CLASSES = 20  # per-class counts in a warning: every class up to this many, else the affected ones

log = logging.getLogger("vistune.data")


class DataWarning(UserWarning):
    """Something about the data a user should know (a split lacking classes, one file in two splits, ...).

    Every such warning is also in :attr:`DataSplits.warnings`; a caller that prints those itself can
    ``warnings.simplefilter("ignore", DataWarning)``."""


@dataclass
class DataSplits:
    train: Dataset  # items: (image tensor CxHxW float, int label)
    val: Dataset
    test: Dataset | None
    class_names: list[str]
    source: str  # the spec string it was loaded from
    val_from_train: bool  # True when val was a fixed-seed stratified split of train
    data_seed: int = DEFAULT_DATA_SEED  # the seed of the val carve and of the train/val subsets
    val_note: str = ""  # when val_from_train: one sentence saying so (how many images, which seed), to print
    warnings: list[str] = field(default_factory=list)  # sentences to show the user (also sent as DataWarning)

    def summary(self) -> str:
        test = f"{len(self.test)} test" if self.test is not None else "no test"
        return f"{len(self.train)} train / {len(self.val)} val / {test}, {len(self.class_names)} classes"

    def class_counts(self) -> dict[str, np.ndarray]:
        """Images per class (index = label) of each split with image-level labels; segmentation splits,
        labelled per pixel, are left out."""
        out = {}
        for name in SPLITS:
            labels = getattr(getattr(self, name), "labels", None)
            if labels is not None:
                out[name] = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(self.class_names))
        return out

    def counts_table(self) -> str:
        """The per-class image counts of every split as a plain-text table (one row per class)."""
        counts = self.class_counts()
        if not counts:
            return ""
        width = max(len("class"), *(len(n) for n in self.class_names))
        cols = list(counts)
        rows = [f"{'class':<{width}}  " + "  ".join(f"{c:>6}" for c in cols)]
        for k, name in enumerate(self.class_names):
            rows.append(f"{name:<{width}}  " + "  ".join(f"{int(counts[c][k]):>6}" for c in cols))
        rows.append(f"{'total':<{width}}  " + "  ".join(f"{int(counts[c].sum()):>6}" for c in cols))
        return "\n".join(rows)


def _positive_int(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise VistuneError(f"{name} must be a positive integer, got {value!r}", f"e.g. {name}=800")
    return int(value)


def resolve_data_seed(data_seed, seed) -> int:
    """``data_seed`` if given, else the older ``seed`` argument, else 0."""
    value = data_seed if data_seed is not None else seed if seed is not None else DEFAULT_DATA_SEED
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        name = "data_seed" if data_seed is not None else "seed"
        raise VistuneError(f"{name} must be a non-negative integer, got {value!r}", "e.g. data_seed=0")
    return int(value)


def resolve(spec: str, protocol: str) -> dict:
    """Read the raw splits of ``spec``: {'class_names', 'train', 'val'|None, 'test'|None, ['final_train'],
    ['val_missing'] (what is missing when val is None, for the note), ['warnings']}."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "train").is_dir():
            return read_folder(path)
        if any((path / name).is_file() for name in LIST_FILES):
            return read_list_folder(path, protocol)
        subdirs = visible_dirs(path)
        hint = ""
        if subdirs and any(images_under(d) for d in subdirs[:20]):
            hint = (f" (its sub-folders {', '.join(d.name for d in subdirs[:5])}{'…' if len(subdirs) > 5 else ''} "
                    "hold images: if they are classes, move them into a train/ folder)")
        raise VistuneError(
            f"{path} has neither a train/ folder nor list files ({', '.join(LIST_FILES)}){hint}",
            f"lay it out as {path}/train/<class>/<image> (optional val/ and test/ alike), "
            "or add NOAH/VTAB-1k list files with lines '<relative/path> <label>'",
        )
    if path.is_file():
        if spec.lower().endswith((".tar.gz", ".tgz", ".tar")):
            return read_image_tarball(path)
        raise VistuneError(f"{path} is a file, not a data folder",
                           f"give the folder that holds train/ or the list files (perhaps {path.parent})")
    name, sep, arg = spec.partition(":")
    key = name.strip().lower().replace("_", "-")
    if key == "cifar10" and sep and Path(arg).expanduser().is_dir():
        return resolve(arg, protocol)  # an extracted cifar10 tarball is a plain folder
    if key in BUILTIN_DATASETS:
        return load_builtin(key, arg if sep else None)
    looks_like_path = os.sep in spec or "/" in spec or spec.startswith(".")
    where = f"no such folder: {spec}" if looks_like_path and not sep else f"unknown data set {spec!r}"
    raise VistuneError(
        f"{where}; it is neither a folder nor a built-in data set.{suggest(key, BUILTIN_DATASETS)}",
        "give a folder (train/<class>/<image>, or NOAH/VTAB-1k list files) or a built-in data set: "
        + ", ".join(k + (":<path>" if k == "cifar10" else "") for k in BUILTIN_DATASETS),
    )


# ------------------------------------------------------------------------------------------ the checks
def _per_class(class_names: list[str], counts: dict[str, np.ndarray], which: np.ndarray) -> str:
    """'per-class images train/val: cat 8/2, dog 8/0' over every class when few, else over ``which``."""
    shown = np.arange(len(class_names)) if len(class_names) <= _LISTED_CLASSES else which[:_LISTED_CLASSES]
    more = "" if len(shown) == len(class_names) or len(which) <= _LISTED_CLASSES else f", … ({len(which)} in all)"
    cells = ", ".join(f"{class_names[k]} " + "/".join(str(int(c[k])) for c in counts.values()) for k in shown)
    return f"per-class images {'/'.join(counts)}: {cells}{more}"


def coverage_warnings(class_names: list[str], counts: dict[str, np.ndarray]) -> list[str]:
    """Warnings for a val/test split lacking classes train has, and for train lacking classes val/test hold."""
    out = []
    train = counts["train"]
    for name in ("val", "test"):
        if name not in counts:
            continue
        lacking = np.flatnonzero((train > 0) & (counts[name] == 0))
        if lacking.size:
            consequence = ("model selection on val never sees them" if name == "val"
                           else "the test score says nothing about them")
            out.append(f"{name} has no images of {lacking.size} of the {int((train > 0).sum())} classes train has "
                       f"({', '.join(class_names[k] for k in lacking[:10])}{'…' if lacking.size > 10 else ''}): "
                       f"{consequence}; {_per_class(class_names, {'train': train, name: counts[name]}, lacking)}")
    held = sum((counts[n] for n in ("val", "test") if n in counts), np.zeros_like(train))
    untrained = np.flatnonzero((train == 0) & (held > 0))
    if untrained.size:
        out.append(f"train has no images of {untrained.size} class(es) that val/test hold "
                   f"({', '.join(class_names[k] for k in untrained[:10])}{'…' if untrained.size > 10 else ''}): "
                   f"the model cannot learn them; {_per_class(class_names, counts, untrained)}")
    return out


def _file_keys(paths: list[str], cache: dict) -> list:
    keys = []
    for p in paths:
        key = cache.get(p)
        if key is None:
            try:
                st = os.stat(p)
                key = (st.st_dev, st.st_ino)
            except OSError:  # gone since it was listed: verify_decodable reports it
                key = ("path", p)
            cache[p] = key
        keys.append(key)
    return keys


_SHARED_MEANS = {("train", "val"): "val scores partly measure images the model trains on",
                 ("train", "test"): "test scores partly measure images the model trains on",
                 ("val", "test"): "what is selected on val is partly tested on the same images"}


def overlap_warnings(named: dict[str, Dataset]) -> list[str]:
    """Warnings for an image file listed twice within a split, or in two splits (compared as files: the
    same file under two paths counts), for the splits read from files."""
    cache: dict = {}
    keys: dict[str, list] = {}
    paths_of: dict[str, dict] = {}
    out = []
    for name, ds in named.items():
        if isinstance(ds, FileDataset):
            keys[name] = _file_keys(ds.paths, cache)
            first: dict = {}
            repeats = []
            for path, key in zip(ds.paths, keys[name]):
                if key in first:
                    repeats.append(path)
                else:
                    first[key] = path
            paths_of[name] = first
            if repeats:
                out.append(f"{name} holds {len(repeats)} image file(s) more than once (a repeated line, or two "
                           f"paths to one file), e.g. {', '.join(repeats[:3])}: each copy counts again")
    for (a, b), meaning in _SHARED_MEANS.items():
        if a in keys and b in keys:
            shared = set(keys[a]) & set(keys[b])
            if shared:
                examples = sorted(paths_of[b][k] for k in shared)[:3]
                out.append(f"{b} and {a} share {len(shared)} image file(s), e.g. {', '.join(examples)}: {meaning}")
    return out


# ------------------------------------------------------------------------------------------- load_data
def load_data(spec: str, *, train_transform, eval_transform, train_size: int | None = None,
              val_size: int | None = None, test_size: int | None = None, data_seed: int | None = None,
              val_fraction: float = 0.2, protocol: str = "train-val", seed: int | None = None) -> DataSplits:
    """Load train / val / (test) splits from a folder, list-file folder, built-in name or ``cifar10:<path>``.

    Without a val split, val is a stratified ``val_fraction`` (or ``val_size``) of train, fixed by
    ``data_seed`` (default 0; it never needs to follow the training seed), and ``DataSplits.val_note`` says
    so. ``train_size``/``val_size`` take stratified subsets (VTAB-1k style: 800/200), also by ``data_seed``.
    ``protocol='final'`` trains on train ∪ val (val stays as it is, for monitoring). ``test_size`` evaluates
    on a fixed stratified subset of test (seed 0, the same for every run), for quick comparisons.

    ``seed``: the older name of ``data_seed``, used when ``data_seed`` is not given (artifacts that stored
    their split settings under it redraw the same val split).

    Splits lacking classes, and image files in two splits or twice in one, give ``DataSplits.warnings``
    (each also issued as a :class:`DataWarning`)."""
    if protocol not in PROTOCOLS:
        raise VistuneError(f"unknown protocol {protocol!r}.{suggest(str(protocol), PROTOCOLS)}",
                           "use 'train-val' (select on val) or 'final' (retrain on train + val)")
    train_size = _positive_int(train_size, "train_size")
    val_size = _positive_int(val_size, "val_size")
    test_size = _positive_int(test_size, "test_size")
    data_seed = resolve_data_seed(data_seed, seed)
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise VistuneError(f"val_fraction must be between 0 and 1, got {val_fraction!r}", "e.g. val_fraction=0.2")
    raw = resolve(str(spec), protocol)
    notes = list(raw.get("warnings", []))
    class_names = list(raw["class_names"])
    pool: ImageDataset = raw["train"]
    val: ImageDataset | None = raw["val"]
    test: ImageDataset | None = raw["test"]
    val_from_train = val is None
    val_note = ""
    if val is None:
        n_val = val_size if val_size is not None else max(1, round(val_fraction * len(pool)))
        can_give = int(np.sum(np.maximum(np.bincount(pool.labels) - 1, 0)))
        if n_val > can_give:
            raise VistuneError(
                f"{spec} has {len(pool)} training images: too few to split off {n_val} for validation "
                "while keeping every class in train",
                "add images, add a val split, or ask for fewer validation images (val_size / val_fraction)",
            )
        val_idx, rest = stratified_pick(pool.labels, n_val, data_seed, keep_one=True)
        missing = raw.get("val_missing") or f"{spec} has no val split"
        if val_size is None:
            share = f"{val_fraction:.0%} of train ({n_val} of {len(pool)} images, stratified, data seed {data_seed}) is"
        else:
            share = f"{n_val} of train's {len(pool)} images (val_size, stratified, data seed {data_seed}) are"
        val_note = (f"{missing}: {share} used for validation"
                    + (" (and, with protocol 'final', trained on too)" if protocol == "final" else ""))
        val, pool = pool.subset(val_idx), pool.subset(rest)
    elif val_size is not None:
        if val_size > len(val):
            raise VistuneError(f"val_size={val_size} exceeds the {len(val)} validation images of {spec}",
                               f"use val_size of at most {len(val)}")
        val = val.subset(stratified_pick(val.labels, val_size, data_seed)[0])
    if train_size is not None:
        if train_size > len(pool):
            after = f" (after splitting off {len(val)} for validation)" if val_from_train else ""
            raise VistuneError(f"train_size={train_size} exceeds the {len(pool)} training images of {spec}{after}",
                               f"use train_size of at most {len(pool)}")
        pool = pool.subset(stratified_pick(pool.labels, train_size, data_seed)[0])
    if test_size is not None and test is not None and test_size < len(test):
        test = test.subset(stratified_pick(test.labels, test_size, 0)[0])
    notes += overlap_warnings({"train": pool, "val": val, **({"test": test} if test is not None else {})})
    if protocol == "final":
        if raw.get("final_train") is not None and train_size is None and val_size is None:
            pool = raw["final_train"]
        else:
            pool = concat(pool, val, None)
    splits = DataSplits(
        train=pool.with_transform(train_transform),
        val=val.with_transform(eval_transform),
        test=test.with_transform(eval_transform) if test is not None else None,
        class_names=class_names,
        source=str(spec),
        val_from_train=val_from_train,
        data_seed=data_seed,
        val_note=val_note,
    )
    splits.warnings = notes + coverage_warnings(class_names, splits.class_counts())
    emit(splits)
    return splits


def emit(splits: DataSplits, stacklevel: int = 2) -> None:
    """Issue ``splits.warnings`` as :class:`DataWarning` and log ``splits.val_note`` (INFO, 'vistune.data').

    ``stacklevel`` counts from emit's caller, as ``warnings.warn``'s from its own: 2 names the line that
    called the function which called emit (the user's ``load_data(...)``)."""
    for text in splits.warnings:
        warnings.warn(text, DataWarning, stacklevel=stacklevel + 1)
    if splits.val_note:
        log.info(splits.val_note)
