"""One training job end to end: backbone + data + method → trained artifact + metrics.json.

``vistune train``, ``vistune demo`` and ``vistune bench`` all go through :func:`run_job`.
"""
from __future__ import annotations

import json
import platform
import warnings
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch

from . import __version__
from ._io import atomic_write_json
from .artifacts import artifact_bytes, save_artifact
from .backbones import BackboneView, load_backbone
from .data import DataSplits, DataWarning, build_transforms, load_data, verify_decodable
from .data.segmentation import SEG_BUILTINS, is_segmentation_data, load_segmentation_data, seg_transforms
from .errors import VistuneError
from .methods import MethodConfig, adapt, count_parameters, make_config
from .training import TrainConfig, distributed, evaluate, train
from .training.trainer import resolve_device

METRICS = "metrics.json"


@dataclass
class Job:
    backbone: str
    method: str
    data: str
    out: str | None = None
    overrides: dict = field(default_factory=dict)  # method options (--set key=value)
    checkpoint: str | None = None
    random_init: bool = False
    model_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None
    normalization: str = "pretrained_cfg"
    augment: bool = False
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    data_seed: int = 0  # draws the val carve and the subsets; independent of the training seed
    protocol: str = "train-val"
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str = "classification"  # or "segmentation": FPN decoder head, image/mask data, mIoU


def data_for_task(task: str):
    """(transforms builder, data loader) of a task: images + labels, or images + masks."""
    if task == "segmentation":
        return seg_transforms, load_segmentation_data
    return transforms_for, load_data


def preprocessing_for(backbone: BackboneView, job: Job) -> dict:
    cfg = timm.data.resolve_data_config({}, model=backbone.model)
    data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    return {"data_config": data_config, "image_size": job.image_size or cfg["input_size"][-1],
            "normalization": job.normalization, "augment": job.augment}


def transforms_for(preprocessing: dict):
    return build_transforms(preprocessing["data_config"], image_size=preprocessing["image_size"],
                            normalization=preprocessing["normalization"], augment=preprocessing["augment"])


def split_settings(job: Job) -> dict:
    """How the splits were drawn; stored in the artifact so `vistune eval` can redraw the same val split."""
    return {"train_size": job.train_size, "val_size": job.val_size, "test_size": job.test_size,
            "data_seed": job.data_seed, "protocol": job.protocol}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; on a CPU the peak resident memory of this process (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux: not ru_maxrss, which a child process inherits from its parent (the kernel keeps the larger of
    # the two across fork and exec), so a child would report at least its parent's peak; VmHWM is the
    # high-water mark of this process's own address space, which starts afresh at exec
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        kib = 1 / 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1024


def check_out_dir(out: Path, resume: bool) -> None:
    """Never overwrite a finished run by accident: that would lose a user's artifact."""
    if resume:
        return
    if (out / METRICS).exists():
        raise VistuneError(
            f"{out} already holds a finished run ({METRICS})",
            "choose another --out folder, or delete that one if you no longer need it",
        )
    from .training.trainer import STATE_FILE

    if (out / STATE_FILE).exists():
        raise VistuneError(
            f"{out} holds an interrupted run ({STATE_FILE})",
            "add --resume to continue it, or choose another --out folder",
        )


@dataclass
class JobSetup:
    """What a job resolves to before any training: shared by :func:`run_job` and ``vistune calibrate``."""

    job: Job
    backbone: BackboneView
    preprocessing: dict
    data: DataSplits
    config: MethodConfig
    device: torch.device


def _method_config(job: Job, image_size: int | None) -> MethodConfig:
    return make_config(job.method, job.overrides, image_size=image_size)


def prepare_job(job: Job, *, backbone: BackboneView | None = None, data: DataSplits | None = None,
                augment: bool | None = None, notify: Callable[[str], None] | None = None) -> JobSetup:
    """Resolve a job: its method config (validated before any slow loading), device, backbone, preprocessing and
    data splits, every image file of which is checked to decode before any training. ``augment=False`` loads the
    training split with the eval transform (calibration passes). ``notify(line)`` hears what a user should know
    about the data before training starts (the splits, a val split carved from train, classes a split lacks)."""
    config = _method_config(job, job.image_size)  # fails fast on a bad option; built once when sized by --image-size
    device = resolve_device(job.train.device)
    if backbone is None:
        backbone = load_backbone(job.backbone, checkpoint=job.checkpoint, random_init=job.random_init,
                                 model_kwargs=job.model_kwargs)
    prep = preprocessing_for(backbone, job)
    if augment is not None:
        prep = {**prep, "augment": augment}
    if job.image_size is None and "image_size" in config.to_dict():
        config = _method_config(job, prep["image_size"])  # an input-sized method gets the backbone's size
    if data is None:
        if job.task != "segmentation" and is_segmentation_data(job.data):
            raise VistuneError(f"{job.data!r} is a segmentation data set ({', '.join(SEG_BUILTINS)})",
                               "add --task segmentation")
        make_transforms, load = data_for_task(job.task)
        train_tf, eval_tf = make_transforms(prep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if notify is not None else "default", DataWarning)  # notify says them
            data = load(job.data, train_transform=train_tf, eval_transform=eval_tf, **split_settings(job))
        verify_decodable(data)
        if notify is not None:
            for line in [f"data: {data.summary()}", getattr(data, "val_note", None), *getattr(data, "warnings", [])]:
                if line:
                    notify(line)
    return JobSetup(job, backbone, prep, data, config, device)


def run_job(job: Job, *, resume: bool = False, progress: bool = True,
            backbone: BackboneView | None = None, data: DataSplits | None = None, on_step=None,
            notify: Callable[[str], None] | None = None) -> dict:
    """Train one method on one dataset; writes the artifact and metrics.json when ``job.out``.
    ``on_step(done, total)``: called after every training step (see :func:`~vistune.training.train`);
    ``notify(line)``: see :func:`prepare_job`."""
    out = Path(job.out) if job.out else None
    progress = progress and distributed.is_main()
    if out is not None:
        check_out_dir(out, resume)
    setup = prepare_job(job, backbone=backbone, data=data, notify=notify)
    backbone, prep, data, config, device = setup.backbone, setup.preprocessing, setup.data, setup.config, setup.device
    make_transforms = data_for_task(job.task)[0]
    torch.manual_seed(job.train.seed)  # the method's own initialisation
    model = adapt(backbone, config, num_classes=len(data.class_names), task=job.task)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if not resume:  # a resumed run restores the prepared state from its checkpoint
        eval_tf = make_transforms({**prep, "augment": False})[1]
        model.prepare(data.train.with_transform(eval_tf), device=device,
                      batch_size=max(64, job.train.batch_size), progress=progress)
    result = train(model, data.train, data.val, job.train, out_dir=out, resume=resume, progress=progress,
                   augment=job.augment, on_step=on_step)
    wall = time.perf_counter() - t0
    test = None
    if data.test is not None:
        test = evaluate(model, data.test, batch_size=max(64, job.train.batch_size), device=device,
                        amp=job.train.amp, progress=progress, desc="test")
    metrics = job_metrics(setup, model, result, test, wall)
    if out is not None and distributed.is_main():  # under torchrun, rank 0 alone writes
        metrics["artifact_bytes"] = save_artifact(model, out, class_names=data.class_names, preprocessing=prep,
                                                  extra={"data": {"spec": job.data, **split_settings(job)}})
        atomic_write_json(out / METRICS, metrics)
    metrics["model"] = model  # for in-process callers; not serialised
    return metrics


def job_metrics(setup: JobSetup, model, result, test: dict | None, wall: float) -> dict:
    """metrics.json of a finished job (``result``: its TrainResult; ``test``: the test scores, if any)."""
    job, backbone, prep, data, config, device = (setup.job, setup.backbone, setup.preprocessing, setup.data,
                                                 setup.config, setup.device)
    segmentation = job.task == "segmentation"
    counts = count_parameters(model)
    return {
        "method": job.method,
        "method_config": config.to_dict(),
        "backbone": job.backbone,
        "backbone_source": backbone.spec.source,
        "data": job.data,
        "data_summary": data.summary(),
        "num_classes": len(data.class_names),
        "val_accuracy": result.val_accuracy,
        "best_epoch": result.best_epoch,
        "test_accuracy": None if test is None else test["accuracy"],
        **({"task": "segmentation", "val_miou": result.val_miou,  # accuracy = pixel accuracy
            "test_miou": None if test is None else test["miou"],
            "test_iou": None if test is None else test["iou"]} if segmentation else {}),
        **counts,
        "tuned_percent": 100 * counts["tuned_params"] / counts["backbone_params"],
        "train_seconds": result.train_seconds,
        "wall_seconds": wall,
        "peak_memory_mb": peak_memory_mb(device),
        "epochs": job.train.epochs,
        "seed": job.train.seed,
        "train_config": {**asdict(job.train), "effective_lr": job.train.effective_lr(model),
                         "optimizer": job.train.resolved_optimizer(model)},
        "preprocessing": prep,
        "history": result.history,
        "device": str(device),
        "processes": distributed.world_size(),  # > 1: data-parallel under torchrun (metrics from rank 0)
        "versions": {"vistune": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def read_metrics(out: str | Path) -> dict:
    return json.loads((Path(out) / METRICS).read_text())


__all__ = ["Job", "JobSetup", "prepare_job", "run_job", "job_metrics", "read_metrics", "preprocessing_for", "transforms_for", "artifact_bytes"]
