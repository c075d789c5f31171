"""``vistune data vtab --download``: the 19 VTAB-1k tasks from tensorflow-datasets, in the list-file layout.

Each task becomes ``<out>/<task>/`` holding ``images/<split>/<index>.png``, the list files train800.txt,
val200.txt, train800val200.txt and test.txt (lines ``images/<split>/<index>.png <label>``, the form
``read_list_folder`` reads), classes.txt and manifest.json (source, split definitions, counts and the
sha256 of every file). The splits and labels are VTAB's own (google-research/task_adaptation, the
definitions VPT and NOAH use): train800 = the first 800 of the task's train split, val200 = 200 held-out
training (or validation) images, test = the task's test split; structured tasks derive their label from
the example's annotations as VTAB does. Images are written losslessly (PNG) exactly as tfds decodes them.

A task folder appears only when complete (it is written under a temporary name and renamed), so an
interrupted download is continued by running the same command again; finished tasks are skipped.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._io import atomic_dir, atomic_write_json, sha256_file
from ..errors import VistuneError, suggest
from .datasets import LIST_FILES

MANIFEST = "manifest.json"
SPLITS = ("train800", "val200", "test")  # train800val200 lists the images of the first two
INSTALL = "pip install 'vistune[vtab]'"
NETWORK_PROBE = ("storage.googleapis.com", 443)  # where tfds fetches prepared data and most sources


# ------------------------------------------------------------------------------ VTAB's split definitions
def _carve(train_percent: int, test: str = "test") -> Callable[[dict], dict]:
    """val200 = the 200 training examples after the first ``train_percent`` % (VTAB's held-out train part)."""
    def splits(n: dict) -> dict:
        start = train_percent * n["train"] // 100
        return {"train800": "train[:800]", "val200": f"train[{start}:{start + 200}]", "test": test}
    return splits


def _validation(n: dict) -> dict:
    return {"train800": "train[:800]", "val200": "validation[:200]", "test": "test"}


def _three_way(train_percent: int, val_percent: int) -> Callable[[dict], dict]:
    """One tfds split cut into train / val / test by percentages (EuroSAT, RESISC45, dSprites)."""
    def splits(n: dict) -> dict:
        train, val = train_percent * n["train"] // 100, val_percent * n["train"] // 100
        return {"train800": "train[:800]", "val200": f"train[{train}:{train + 200}]", "test": f"train[{train + val}:]"}
    return splits


def _smallnorb(n: dict) -> dict:
    return {"train800": "train[:800]", "val200": "test[:200]", "test": "test[50%:]"}


def _clevr_count(ex: dict) -> int:
    return len(ex["objects"]["size"]) - 3  # 3-10 objects → 8 classes


def _below(thresholds, value) -> int:
    """Index of the last threshold below ``value`` (VTAB's binning of distances and positions)."""
    return int(np.max(np.flatnonzero(np.asarray(thresholds) - value < 0)))


def _clevr_distance(ex: dict) -> int:
    return _below([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], np.min(ex["objects"]["pixel_coords"][:, 2]))


def _kitti_vehicle_distance(ex: dict) -> int:
    vehicles = ex["objects"]["type"] < 3  # Car, Van, Truck
    depth = np.concatenate([ex["objects"]["location"][vehicles, 2], [1000.0]])
    return _below([-100.0, 8.0, 20.0, 999.0], np.min(depth))


def _dsprites(attribute: str, original_classes: int) -> Callable[[dict], int]:
    factor = np.float32(original_classes / 16)  # VTAB groups neighbouring values into 16 classes

    def label(ex: dict) -> int:
        return int(np.floor(np.float32(ex[attribute]) / factor))
    return label


@dataclass(frozen=True)
class VtabTask:
    name: str
    group: str
    tfds_name: str
    splits: Callable[[dict], dict]  # {tfds split: examples} → {train800|val200|test: tfds split expression}
    derive_label: Callable[[dict], int] | None = None  # None: the class label feature below
    num_classes: int | None = None  # with derive_label
    label_feature: str = "label"
    pixel_scale: int = 1  # dSprites stores 0/1 pixels

    def label(self, ex: dict) -> int:
        return self.derive_label(ex) if self.derive_label else int(ex[self.label_feature])

    def class_names(self, features) -> list[str]:
        if self.derive_label:
            return [str(i) for i in range(self.num_classes)]
        return list(features[self.label_feature].names)


TASKS: dict[str, VtabTask] = {t.name: t for t in [
    VtabTask("caltech101", "Natural", "caltech101:3.*.*", _carve(90)),
    VtabTask("cifar", "Natural", "cifar100:3.*.*", _carve(90)),
    VtabTask("dtd", "Natural", "dtd:3.*.*", _validation),
    VtabTask("oxford_flowers102", "Natural", "oxford_flowers102:2.*.*", _validation),
    VtabTask("oxford_iiit_pet", "Natural", "oxford_iiit_pet:3.*.*", _carve(80)),
    VtabTask("svhn", "Natural", "svhn_cropped:3.*.*", _carve(90)),
    VtabTask("sun397", "Natural", "sun397/tfds:4.*.*", _validation),
    VtabTask("patch_camelyon", "Specialized", "patch_camelyon:2.*.*", _validation),
    VtabTask("eurosat", "Specialized", "eurosat/rgb:2.*.*", _three_way(60, 20)),
    VtabTask("resisc45", "Specialized", "resisc45:3.*.*", _three_way(60, 20)),
    VtabTask("diabetic_retinopathy", "Specialized", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
             _validation),
    VtabTask("clevr_count", "Structured", "clevr:3.*.*", _carve(90, test="validation"), _clevr_count, 8),
    VtabTask("clevr_dist", "Structured", "clevr:3.*.*", _carve(90, test="validation"), _clevr_distance, 6),
    VtabTask("dmlab", "Structured", "dmlab:2.0.1", _validation),
    VtabTask("kitti", "Structured", "kitti:3.1.0", _validation, _kitti_vehicle_distance, 4),
    VtabTask("dsprites_loc", "Structured", "dsprites:2.*.*", _three_way(80, 10),
             _dsprites("label_x_position", 32), 16, pixel_scale=255),
    VtabTask("dsprites_ori", "Structured", "dsprites:2.*.*", _three_way(80, 10),
             _dsprites("label_orientation", 40), 16, pixel_scale=255),
    VtabTask("smallnorb_azi", "Structured", "smallnorb:2.*.*", _smallnorb, label_feature="label_azimuth"),
    VtabTask("smallnorb_ele", "Structured", "smallnorb:2.*.*", _smallnorb, label_feature="label_elevation"),
]}


# ---------------------------------------------------------------------------------------- the writer
def _rgb(image: np.ndarray, pixel_scale: int) -> np.ndarray:
    a = np.asarray(image)
    if pixel_scale != 1:
        a = a.astype(np.int64) * pixel_scale
    a = a.astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return np.stack([a] * 3, axis=-1) if a.ndim == 2 else a


def write_task(folder: str | os.PathLike, examples: dict[str, Iterable[tuple[np.ndarray, int]]],
               class_names: list[str], source: dict) -> dict:
    """Write one task from ``{train800|val200|test: iterable of (HxWxC uint8 image, label)}``.

    The folder is built under a temporary name beside ``folder`` and renamed when complete; returns the
    manifest (also written as manifest.json)."""
    folder = Path(folder)
    if folder.exists():
        raise VistuneError(f"{folder} already exists", "choose another --out folder or remove that task folder")
    with atomic_dir(folder) as staging:
        lines: dict[str, list[str]] = {}
        for split in SPLITS:
            (staging / "images" / split).mkdir(parents=True)
            lines[split] = []
            for i, (image, label) in enumerate(examples[split]):
                label = int(label)
                if not 0 <= label < len(class_names):
                    raise VistuneError(f"{folder.name}/{split}: example {i} has label {label}, outside the "
                                       f"{len(class_names)} classes", "report this: the task definition is wrong")
                rel = f"images/{split}/{i:06d}.png"
                Image.fromarray(np.ascontiguousarray(image)).save(staging / rel)
                lines[split].append(f"{rel} {label}")
        lists = {"train800.txt": lines["train800"], "val200.txt": lines["val200"],
                 "train800val200.txt": lines["train800"] + lines["val200"], "test.txt": lines["test"]}
        assert tuple(lists) == LIST_FILES
        for name, entries in lists.items():
            (staging / name).write_text("".join(f"{line}\n" for line in entries), encoding="utf-8")
        (staging / "classes.txt").write_text("".join(f"{c}\n" for c in class_names), encoding="utf-8")
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        manifest = {"task": folder.name, "source": source, "num_classes": len(class_names),
                    "counts": {split: len(lines[split]) for split in SPLITS},
                    "sha256": {rel: sha256_file(staging / rel) for rel in files}}
        atomic_write_json(staging / MANIFEST, manifest)
    return manifest


def verify_task(folder: str | os.PathLike) -> list[str]:
    """Files of a written task that are missing or differ from its manifest (empty: intact)."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    bad = []
    for rel, digest in manifest["sha256"].items():
        path = folder / rel
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(rel)
    return bad


# ------------------------------------------------------------------------------------- tfds download
def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise VistuneError(f"`vistune data vtab --download` needs tensorflow-datasets, which cannot be imported "
                           f"({e})", f"{INSTALL} (tensorflow-datasets and tensorflow), or prepare the folders "
                           "with the NOAH/VPT scripts (docs/benchmarks.md)") from e
    return tfds


def _check_network() -> None:
    host, port = NETWORK_PROBE
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise VistuneError(f"cannot reach {host}:{port} ({e}): tensorflow-datasets needs the network to download "
                           "VTAB's source data", "run `vistune data vtab --download` on a machine with internet "
                           "access (or with the tfds data already prepared in --tfds-dir), then copy --out here"
                           ) from e


def select_tasks(names: list[str] | None) -> list[VtabTask]:
    if not names:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise VistuneError(f"unknown VTAB-1k task(s): {', '.join(unknown)}.{suggest(unknown[0], TASKS)}",
                           f"the tasks are: {', '.join(TASKS)}")
    return [TASKS[n] for n in names]


def _examples(tfds, builder, expression: str, task: VtabTask) -> Iterator[tuple[np.ndarray, int]]:
    ds = builder.as_dataset(split=expression, shuffle_files=False)  # the split's canonical order
    for ex in tfds.as_numpy(ds):
        yield _rgb(ex["image"], task.pixel_scale), task.label(ex)


def download(out: str | os.PathLike, tasks: list[str] | None = None, *, tfds_dir: str | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Download and write the chosen VTAB-1k tasks (all 19 by default) under ``out``; skips finished ones."""
    chosen = select_tasks(tasks)
    tfds = _import_tfds()
    out = Path(out)
    written, network_checked = [], False
    for task in chosen:
        folder = out / task.name
        if (folder / MANIFEST).is_file():
            log(f"{task.name}: already in {folder} (verify with `vistune data vtab --out {out}`)")
            continue
        builder = tfds.builder(task.tfds_name, data_dir=tfds_dir)
        if not builder.is_prepared():
            if not network_checked:
                _check_network()
                network_checked = True
            log(f"{task.name}: tensorflow-datasets prepares {task.tfds_name} (large sets take long) …")
            try:
                builder.download_and_prepare()
            except Exception as e:  # tfds raises many types (manual downloads, checksums, HTTP errors)
                raise VistuneError(f"tensorflow-datasets could not prepare {task.tfds_name} for {task.name}: {e}",
                                   "follow tfds's instructions for that data set (diabetic_retinopathy needs "
                                   "a manual Kaggle download into <tfds dir>/downloads/manual), then run the "
                                   "same command again") from e
        sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
        expressions = task.splits(sizes)
        class_names = task.class_names(builder.info.features)
        source = {"tfds_name": task.tfds_name, "tfds_version": str(builder.info.version),
                  "splits": expressions, "definition": "google-research/task_adaptation (VTAB-1k)"}
        log(f"{task.name}: writing {', '.join(f'{k} = {v}' for k, v in expressions.items())} …")
        examples = {split: _examples(tfds, builder, expr, task) for split, expr in expressions.items()}
        written.append(write_task(folder, examples, class_names, source))
    return written
