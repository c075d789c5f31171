"""`vistune distill`: knowledge distillation from a vistune artifact (the teacher) into a student job.

The teacher is any artifact (any backbone, any method); the student any backbone with any method. The student's job
is an ordinary :class:`~vistune.run.Job` — its backbone, method, data and preprocessing are its own — trained with
the :class:`~vistune.training.distill.Distillation` objective instead of plain cross-entropy, and what it writes is
that method's normal artifact (eval, predict, export and merge work on it unchanged) whose ``adapter.json`` and
``metrics.json`` also name the teacher and the distillation settings (``"distillation"``).

Each model sees the same image region under its own preprocessing: without augmentation the teacher's input of an
item is the item's image resized to the teacher's size with its normalisation (its artifact's ``preprocessing``),
computed once (its logits are cached); with ``--augment`` one random crop + flip is drawn per item and epoch and
resized for each model (:class:`PairedViews`), and the teacher runs on every batch. Unlabelled images
(``--unlabelled DIR``) join the training set with label :data:`~vistune.training.distill.UNLABELLED`: they add only
the distillation terms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_write_json
from .artifacts import META_CHECKSUM, check_artifact, load_artifact, save_artifact
from .data import build_transforms
from .data.datasets import FileDataset, ImageDataset, images_under
from .data.images import check_image_file
from .errors import VistuneError
from .methods import adapt
from .methods.procedures import DistillConfig
from .run import METRICS, Job, check_out_dir, job_metrics, prepare_job, read_metrics, split_settings, transforms_for
from .training import distributed, evaluate, train
from .training.distill import UNLABELLED, Distillation


@dataclass
class DistillJob:
    """A student job trained by distillation from the artifact in ``teacher``."""

    student: Job
    teacher: str  # the --out folder of a vistune run
    config: DistillConfig = field(default_factory=DistillConfig)
    unlabelled: str | None = None  # a folder of images without labels (they add only the distillation terms)


# ------------------------------------------------------------------------------------------------ data
class Combined(ImageDataset):
    """The items of several image datasets one after the other (their own images and labels), one transform."""

    def __init__(self, parts: list[ImageDataset], transform=None):
        self.parts, self.transform = parts, transform
        self.labels = np.concatenate([np.asarray(p.labels, dtype=np.int64) for p in parts])
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def image(self, i: int):
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[part].image(i - int(self._starts[part]))

    def subset(self, indices, transform=None) -> ImageDataset:
        parts = []
        idx = np.asarray(indices, dtype=np.int64)
        for k, p in enumerate(self.parts):
            mine = idx[(idx >= self._starts[k]) & (idx < self._starts[k + 1])] - self._starts[k]
            parts.append(p.subset(mine))
        return Combined(parts, transform)


class PairedViews(torch.utils.data.Dataset):
    """``(student x, y, teacher x)``: one random crop + horizontal flip of item i's image per access (the FGVC
    augmentation, RandomResizedCrop's scale and ratio ranges), resized and normalised for each model by its own
    plain transform."""

    def __init__(self, images: ImageDataset, student_transform, teacher_transform):
        from torchvision import transforms as T

        self.images, self.student_transform, self.teacher_transform = images, student_transform, teacher_transform
        self.labels = images.labels
        self._crop, self._flip = T.RandomResizedCrop(1), T.RandomHorizontalFlip()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from torchvision.transforms import functional as TF

        img = self.images.image(i)
        top, left, h, w = self._crop.get_params(img, self._crop.scale, self._crop.ratio)
        view = self._flip(TF.crop(img, top, left, h, w))
        return self.student_transform(view), int(self.labels[i]), self.teacher_transform(view)


def unlabelled_images(folder: str) -> FileDataset:
    """Every image below ``folder`` (recursively), checked to decode, with label UNLABELLED."""
    root = Path(folder)
    if not root.is_dir():
        raise VistuneError(f"--unlabelled {folder} is not a folder", "pass a folder of images (any layout)")
    paths = images_under(root)
    if not paths:
        raise VistuneError(f"--unlabelled {folder} holds no images", "put .png/.jpg images in it (sub-folders are read too)")
    for path in paths:
        check_image_file(path)
    return FileDataset(paths, np.full(len(paths), UNLABELLED, dtype=np.int64))


def _check_classes(teacher_meta: dict, teacher: str, class_names: list[str], data: str) -> None:
    theirs = list(teacher_meta["class_names"])
    if theirs == list(class_names):
        return
    if sorted(theirs) == sorted(class_names):
        what = "the same classes in another order"
    else:
        only_t = [c for c in theirs if c not in class_names][:5]
        only_d = [c for c in class_names if c not in theirs][:5]
        what = f"other classes (only the teacher's: {only_t}; only the data's: {only_d})"
    spec = (teacher_meta.get("data") or {}).get("spec")
    raise VistuneError(
        f"the teacher {teacher} was trained on {len(theirs)} classes {theirs[:8]}, and --data {data} has "
        f"{len(class_names)} classes {list(class_names)[:8]}: {what}; distillation matches logits class by class",
        "distill on data with the teacher's classes in its order" + (f" (the teacher was trained on {spec})"
                                                                     if spec else "")
        + ", or train a teacher on these classes",
    )


def teacher_identity(teacher: str, meta: dict) -> dict:
    """What names a teacher in the student's adapter.json / metrics.json (its files' hashes pin it)."""
    identity = {"path": str(Path(teacher).resolve()), "tensors_sha256": meta["tensors_sha256"],
                "meta_sha256": meta.get(META_CHECKSUM), "method": meta["method"], "config": meta["config"],
                "backbone": meta["backbone"]["name"], "backbone_fingerprint": meta["backbone"]["fingerprint"],
                "num_classes": meta["num_classes"], "preprocessing": meta["preprocessing"]}
    metrics = Path(teacher) / METRICS
    if metrics.is_file():
        recorded = read_metrics(teacher)
        identity.update(val_accuracy=recorded.get("val_accuracy"), test_accuracy=recorded.get("test_accuracy"))
    return identity


def _teacher_transforms(meta: dict):
    """(plain, eval) transforms of the teacher's own preprocessing: plain = resize to its size + its normalisation
    (the view of a training item, as the student's un-augmented one); eval = what `vistune eval` uses."""
    prep = meta["preprocessing"]
    plain = build_transforms(prep["data_config"], image_size=prep["image_size"],
                             normalization=prep.get("normalization", "pretrained_cfg"), augment=False)[1]
    return plain, transforms_for({**prep, "augment": bool(prep.get("augment"))})[1]


# ------------------------------------------------------------------------------------------------- run
def run_distill(djob: DistillJob, *, resume: bool = False, progress: bool = True, backbone=None, data=None,
                on_step=None, notify=None) -> dict:
    """Train ``djob.student`` by distillation from ``djob.teacher``; writes the artifact + metrics.json when the
    student job has ``out``. Returns its metrics (with ``"model"``, as :func:`~vistune.run.run_job`)."""
    job, config = djob.student, djob.config
    if job.task != "classification":
        raise VistuneError("distillation trains classifiers", "drop --task segmentation")
    out = Path(job.out) if job.out else None
    progress = progress and distributed.is_main()
    if out is not None:
        check_out_dir(out, resume)
    if not Path(djob.teacher).is_dir():
        raise VistuneError(f"--teacher {djob.teacher}: no such folder",
                           "pass the --out folder of a `vistune train` run (it holds adapter.json and "
                           "adapter.safetensors)")
    teacher_meta = check_artifact(djob.teacher)  # a damaged teacher fails before anything is loaded
    if teacher_meta.get("task", "classification") != "classification":
        raise VistuneError(f"the teacher {djob.teacher} is a segmentation model",
                           "pass the --out folder of a classification run as --teacher")
    unlabelled = unlabelled_images(djob.unlabelled) if djob.unlabelled else None
    setup = prepare_job(job, backbone=backbone, data=data, notify=notify)
    data, prep, device = setup.data, setup.preprocessing, setup.device
    _check_classes(teacher_meta, djob.teacher, data.class_names, job.data)
    teacher, _ = load_artifact(djob.teacher, device=device)
    teacher_plain, teacher_eval = _teacher_transforms(teacher_meta)
    student_plain = transforms_for({**prep, "augment": False})[1]

    labelled = data.train
    images = Combined([labelled, unlabelled]) if unlabelled is not None else labelled
    if job.augment:
        train_set, teacher_inputs = PairedViews(images, student_plain, teacher_plain), None
    else:
        train_set = images.with_transform(student_plain) if unlabelled is not None else labelled
        teacher_inputs = images.with_transform(teacher_plain)

    torch.manual_seed(job.train.seed)  # the student method's own initialisation
    model = adapt(setup.backbone, setup.config, num_classes=len(data.class_names))
    objective = Distillation(teacher, config, student_dim=model.backbone.feature_dim,
                             teacher_dim=teacher.backbone.feature_dim, teacher_inputs=teacher_inputs,
                             label_smoothing=job.train.label_smoothing,
                             identity={"tensors_sha256": teacher_meta["tensors_sha256"],
                                       "unlabelled": None if unlabelled is None else len(unlabelled)})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if not resume:
        model.prepare(labelled.with_transform(student_plain), device=device,
                      batch_size=max(64, job.train.batch_size), progress=progress)
    result = train(model, train_set, data.val, job.train, out_dir=out, resume=resume, progress=progress,
                   augment=job.augment, on_step=on_step, objective=objective)
    wall = time.perf_counter() - t0
    batch = max(64, job.train.batch_size)
    test = teacher_test = None
    if data.test is not None:
        test = evaluate(model, data.test, batch_size=batch, device=device, amp=job.train.amp, progress=progress,
                        desc="test")
        teacher_test = evaluate(teacher, data.test.with_transform(teacher_eval), batch_size=batch, device=device,
                                amp=job.train.amp, desc="teacher test")
    teacher_val = evaluate(teacher, data.val.with_transform(teacher_eval), batch_size=batch, device=device,
                           amp=job.train.amp, desc="teacher val")
    record = {
        "procedure": "distill",
        "teacher": teacher_identity(djob.teacher, teacher_meta),
        "settings": config.to_dict(),
        "teacher_outputs": "cached once per image" if objective.cached else "computed on every batch",
        "labelled_images": len(labelled),
        "unlabelled": None if unlabelled is None else {"path": str(Path(djob.unlabelled).resolve()),
                                                      "images": len(unlabelled)},
        "projector_params": 0 if objective.trainable is None else sum(
            p.numel() for p in objective.trainable.parameters()),
    }
    metrics = job_metrics(setup, model, result, test, wall)
    metrics["distillation"] = {**record, "teacher_val_accuracy": teacher_val["accuracy"],
                               "teacher_test_accuracy": None if teacher_test is None else teacher_test["accuracy"]}
    if out is not None and distributed.is_main():
        metrics["artifact_bytes"] = save_artifact(
            model, out, class_names=data.class_names, preprocessing=prep,
            extra={"data": {"spec": job.data, **split_settings(job)}, "distillation": record})
        atomic_write_json(out / METRICS, metrics)
    metrics["model"] = model
    return metrics
