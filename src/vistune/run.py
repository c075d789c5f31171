"""One training job end to end: backbone + data + method → trained artifact + metrics.json.

``vistune train``, ``vistune demo`` and ``vistune bench`` all go through :func:`run_job`.
"""
from __future__ import annotations

import json
import os
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
from ._io import atomic_write_json, remove_stale_temps
from .artifacts import META, TENSORS, artifact_bytes, save_artifact
from .backbones import BackboneView, load_backbone
from .backbones.input_size import check_image_size, check_input_size, minimum_input_size, pretrained_input_size
from .data import DataSplits, DataWarning, build_transforms, load_data, verify_decodable
from .data.loading import PROTOCOLS
from .data.segmentation import SEG_BUILTINS, is_segmentation_data, load_segmentation_data, seg_transforms
from .data.transforms import NORMALIZATIONS
from .errors import VistuneError
from .methods import MethodConfig, adapt, count_parameters, make_config, resolve_method
from .methods.decoder import TASKS
from .training import TrainConfig, distributed, evaluate, train
from .training.trainer import STATE_FILE, resolve_device

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
    keep_state: bool = False  # keep the training checkpoint (train_state.pt) once the run has finished

    def __post_init__(self) -> None:
        """Every field checked once, when the job is built (the method's options: by its config)."""
        for name in ("backbone", "method", "data"):
            if not isinstance(getattr(self, name), str):
                raise VistuneError(f"Job.{name} {getattr(self, name)!r} must be a string",
                                   f"pass the --{name} name as text")
        if self.out is not None and not isinstance(self.out, (str, os.PathLike)):
            raise VistuneError(f"Job.out {self.out!r} must be a folder path (or None)", "e.g. --out runs/linear")
        for name in ("overrides", "model_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise VistuneError(f"Job.{name} {getattr(self, name)!r} must be a dict", f"e.g. {name}={{}}")
        if self.image_size is not None:
            check_image_size(self.image_size)
        if self.normalization not in NORMALIZATIONS:
            raise VistuneError(f"--normalization {self.normalization!r} is not one of {', '.join(NORMALIZATIONS)}",
                               "use --normalization pretrained_cfg (the backbone's mean/std) or paper (ImageNet's)")
        if self.task not in TASKS:
            raise VistuneError(f"--task {self.task!r} is not one of {', '.join(TASKS)}",
                               "use --task classification or --task segmentation")
        if self.protocol not in PROTOCOLS:
            raise VistuneError(f"Job.protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}",
                               "use 'train-val' (select on val) or 'final' (retrain on train + val)")
        for name in ("train_size", "val_size", "test_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise VistuneError(f"{flag} {value!r} must be a whole number ≥ 1", f"e.g. {flag} 800, or leave it "
                                   "out for the whole split")
        if isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int):
            raise VistuneError(f"--data-seed {self.data_seed!r} must be a whole number", "e.g. --data-seed 0")
        for name in ("augment", "random_init", "keep_state"):
            if not isinstance(getattr(self, name), bool):
                raise VistuneError(f"Job.{name} {getattr(self, name)!r} must be True or False",
                                   f"pass {name}=True or {name}=False")
        if not isinstance(self.train, TrainConfig):
            raise VistuneError(f"Job.train must be a TrainConfig, not {type(self.train).__name__}",
                               "pass train=TrainConfig(...)")


def data_for_task(task: str):
    """(transforms builder, data loader) of a task: images + labels, or images + masks."""
    if task == "segmentation":
        return seg_transforms, load_segmentation_data
    return transforms_for, load_data


def preprocessing_for(backbone: BackboneView, job: Job) -> dict:
    cfg = timm.data.resolve_data_config({}, model=backbone.model)
    data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    size = job.image_size if job.image_size is not None else int(cfg["input_size"][-1])
    return {"data_config": data_config, "image_size": size,
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
    """Before any work: ``out`` must be a folder (or not exist yet) that can be written, and hold nothing a
    run would overwrite — a finished run, or an artifact a user made; an interrupted run only with ``resume``."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == out else f"lies inside {existing}, which is a file"
        raise VistuneError(f"--out {out} {where}, not a folder", "choose a folder for --out (it is created if new)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VistuneError(f"--out {out}: {existing} is not writable by this user",
                           "choose a folder you can write to, or change its permissions")
    if (out / METRICS).exists():
        if resume:
            raise VistuneError(f"--resume: {out} holds a finished run ({METRICS}); there is nothing to resume",
                               f"use its artifact as it is (vistune eval --adapter {out}), or train again in "
                               "another --out folder")
        raise VistuneError(
            f"{out} already holds a finished run ({METRICS})",
            "choose another --out folder, or delete that one if you no longer need it",
        )
    interrupted = (out / STATE_FILE).is_file()
    artifact = [name for name in (META, TENSORS) if (out / name).exists()]
    if artifact and not interrupted:  # not one of ours half-written (that has its checkpoint beside it)
        raise VistuneError(
            f"{out} holds an artifact ({', '.join(artifact)}) that training there would overwrite",
            "choose another --out folder, or move the artifact elsewhere first",
        )
    if resume and not interrupted:
        raise VistuneError(
            f"--resume: no checkpoint {out / STATE_FILE} to resume from",
            "drop --resume to start a new run, or pass the --out folder of the interrupted run",
        )
    if interrupted and not resume:
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
    timings: dict = field(default_factory=dict)  # seconds: backbone (load), data (load + decode check)


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
    timings = {}
    if backbone is None:
        t0 = time.perf_counter()
        backbone = load_backbone(job.backbone, checkpoint=job.checkpoint, random_init=job.random_init,
                                 model_kwargs=job.model_kwargs)
        timings["backbone"] = time.perf_counter() - t0
    prep = preprocessing_for(backbone, job)
    check_input_size(backbone, prep["image_size"])  # before any data is loaded
    if augment is not None:
        prep = {**prep, "augment": augment}
    if job.image_size is None and "image_size" in config.to_dict():
        config = _method_config(job, prep["image_size"])  # an input-sized method gets the backbone's size
    if data is None:
        if job.task != "segmentation" and is_segmentation_data(job.data):
            raise VistuneError(f"{job.data!r} is a segmentation data set ({', '.join(SEG_BUILTINS)})",
                               "add --task segmentation")
        t0 = time.perf_counter()
        make_transforms, load = data_for_task(job.task)
        train_tf, eval_tf = make_transforms(prep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if notify is not None else "default", DataWarning)  # notify says them
            data = load(job.data, train_transform=train_tf, eval_transform=eval_tf, **split_settings(job))
        verify_decodable(data)
        timings["data"] = time.perf_counter() - t0
        if notify is not None:
            for line in [f"data: {data.summary()}", getattr(data, "val_note", None), *getattr(data, "warnings", [])]:
                if line:
                    notify(line)
    return JobSetup(job, backbone, prep, data, config, device, timings)


def job_identity(setup: JobSetup) -> dict:
    """What makes a job this job, as ``{label: value}`` (labels: the `vistune train` options): its method and
    options, task, data and split settings, class names, preprocessing and backbone weights. Stored in the
    run's checkpoint with the training settings, so a ``--resume`` of another job is refused."""
    job, prep = setup.job, setup.preprocessing
    return {
        "--method": job.method,
        **{f"--set {key}": value for key, value in setup.config.to_dict().items()},
        "--task": job.task,
        "--data": str(job.data),
        **{(f"--{key.replace('_', '-')}" if key != "protocol" else key): value
           for key, value in split_settings(job).items()},
        "class names": list(setup.data.class_names),
        "--image-size": prep["image_size"],
        "--normalization": prep["normalization"],
        "--augment": prep["augment"],
        "the backbone's data config": prep["data_config"],
        "--backbone": job.backbone,
        "backbone weights (sha256)": setup.backbone.fingerprint(),
    }


# ---------------------------------------------------------------------------------------- memory
def activation_bytes(backbone: BackboneView, image_size: int) -> tuple[float, float]:
    """(all, largest): bytes of the outputs of the backbone's leaf modules for one fp32 image at ``image_size``
    px — what a training step keeps for the backward pass, and the biggest single tensor of a forward pass.
    Measured by one forward pass at a small size (a model of fixed input size: at its size) and scaled by the
    pixel count; attention matrices inside fused attention are not counted."""
    embed = getattr(backbone.model, "patch_embed", None)
    fixed = getattr(embed, "strict_img_size", False)
    step = 1 if embed is None or getattr(embed, "dynamic_img_pad", False) else max(embed.patch_size)
    probe = image_size if fixed or image_size <= 128 else max(minimum_input_size(backbone), -(-64 // step) * step)
    sizes: list[int] = []

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and not (inputs and output is inputs[0]):  # Identity, eval Dropout
            sizes.append(output.numel() * output.element_size())

    leaves = [m for m in backbone.model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        parameter = next(backbone.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            backbone.forward_features(torch.zeros(1, 3, probe, probe, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    scale = (image_size / probe) ** 2
    return sum(sizes) * scale, max(sizes, default=0) * scale


def available_memory(device: torch.device) -> float | None:
    """Bytes this process can still allocate on ``device`` (RAM: the kernel's MemAvailable, within a cgroup's
    limit), or None when the system does not say."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    found = []
    try:
        with open("/proc/meminfo") as meminfo:
            found += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    try:  # a container's limit (cgroup v2) can be far below the machine's
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    return float(min(found))


def check_memory(setup: JobSetup, *, batch_size: int | None = None, backward: bool | None = None) -> dict:
    """Refuse a job whose rough memory need exceeds what the machine has, before anything large is allocated
    (a run that outgrows RAM is killed by the kernel, often with the machine). The need: the decoded training
    and validation images the trainer keeps in memory, plus one step — ``batch_size`` images (default: the
    job's) with every activation kept for the backward pass when the method trains inside the backbone
    (``backward``; default: unless it trains only a head), else the largest activation of a forward pass of
    a feature/eval batch. Returns the estimate (bytes)."""
    job, size = setup.job, setup.preprocessing["image_size"]
    info, _ = resolve_method(job.method)
    backward = not info.method_class.head_only if backward is None else backward
    batch = job.train.batch_size if batch_size is None else batch_size
    per_process = max(1, batch // distributed.world_size())  # a training step's share under torchrun
    image = 3 * size * size * 4
    every, largest = activation_bytes(setup.backbone, size)
    half = setup.device.type == "cuda" and job.train.amp is not False  # bf16 autocast
    act = 0.5 if half else 1.0
    forward = max(batch, 64) * (image + 2 * largest * act)  # feature, calibration and eval batches
    step = max(per_process * (image + every * act), forward) if backward else forward
    cached = 0.0
    if job.train.cache_inputs and not job.augment:
        cached = image * (len(setup.data.train) + len(setup.data.val))
    estimate = {"cached_images": cached, "step": step}
    kept = ("the decoded train/val images kept in memory", cached)
    one_step = (f"one step of {batch} images", step)
    cpu = torch.device("cpu")
    needs = ([(setup.device, [one_step]), (cpu, [kept])] if setup.device.type == "cuda"
             else [(cpu, [kept, one_step])])
    for device, parts in needs:
        need, available = sum(b for _, b in parts), available_memory(device)
        if available is None or need <= available:
            continue
        memory = "GPU memory" if device.type == "cuda" else "RAM"
        shown = "; ".join(f"{what} {b / 2**30:.1f} GiB" for what, b in parts if b)
        raise VistuneError(
            f"{job.method} on {job.backbone} at --image-size {size} with --batch-size {batch} needs roughly "
            f"{need / 2**30:.1f} GiB of {memory} ({shown}), but {available / 2**30:.1f} GiB is available",
            f"use a smaller --image-size (the backbone's pretrained size is {pretrained_input_size(setup.backbone)})"
            f" or --batch-size{', or fewer training images (--train-size)' if cached > step else ''}",
        )
    return estimate


def run_job(job: Job, *, resume: bool = False, progress: bool = True,
            backbone: BackboneView | None = None, data: DataSplits | None = None, on_step=None,
            notify: Callable[[str], None] | None = None,
            on_epoch: Callable[[dict, int], None] | None = None) -> dict:
    """Train one method on one dataset; writes the artifact and metrics.json when ``job.out``.
    ``on_step(done, total)`` / ``on_epoch(record, epochs)``: called after every training step / epoch (see
    :func:`~vistune.training.train`; on_epoch in the main process only); ``notify(line)``: see :func:`prepare_job`.
    ``metrics["timings"]``: the seconds of each phase of this call (backbone and data loading, the method's
    set-up, decode, frozen features, training, val and test eval, saving) and their ``total``."""
    started = time.perf_counter()
    out = Path(job.out) if job.out else None
    progress = progress and distributed.is_main()
    if out is not None:
        check_out_dir(out, resume)
        if distributed.is_main() and (removed := remove_stale_temps(out)) and notify is not None:
            notify(f"removed {len(removed)} temporary file(s) an interrupted save had left in {out}")
    setup = prepare_job(job, backbone=backbone, data=data, notify=notify)
    check_memory(setup)
    timings = dict(setup.timings)
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
    timings["prepare"] = time.perf_counter() - t0
    result = train(model, data.train, data.val, job.train, out_dir=out, resume=resume, progress=progress,
                   augment=job.augment, on_step=on_step, on_epoch=on_epoch if distributed.is_main() else None,
                   job_identity=job_identity(setup) if out else None, notify=notify)
    timings.update(result.timings)
    wall = time.perf_counter() - t0
    test = None
    if data.test is not None:
        t_test = time.perf_counter()
        test = evaluate(model, data.test, batch_size=max(64, job.train.batch_size), device=device,
                        amp=job.train.amp, progress=progress, desc="test")
        timings["test"] = time.perf_counter() - t_test
    metrics = job_metrics(setup, model, result, test, wall)
    metrics["timings"] = timings
    if out is not None and distributed.is_main():  # under torchrun, rank 0 alone writes
        t_save = time.perf_counter()
        metrics["artifact_bytes"] = save_artifact(model, out, class_names=data.class_names, preprocessing=prep,
                                                  extra={"data": {"spec": job.data, **split_settings(job)}})
        timings["save"] = time.perf_counter() - t_save  # metrics.json itself: written after this
    timings["total"] = time.perf_counter() - started
    if out is not None and distributed.is_main():
        atomic_write_json(out / METRICS, metrics)
        if not job.keep_state:  # only now: a run killed before metrics.json resumes from it
            (out / STATE_FILE).unlink(missing_ok=True)
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
        "train_config": {**asdict(job.train), "base_lr": result.base_lr, "effective_lr": result.effective_lr,
                         "optimizer": job.train.resolved_optimizer(model)},
        "lr_search": result.lr_search,  # --lr auto: the candidates, their val scores and the choice
        "preprocessing": prep,
        "history": result.history,
        "device": str(device),
        "processes": distributed.world_size(),  # > 1: data-parallel under torchrun (metrics from rank 0)
        "versions": {"vistune": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def read_metrics(out: str | Path) -> dict:
    return json.loads((Path(out) / METRICS).read_text())


__all__ = ["Job", "JobSetup", "prepare_job", "run_job", "job_metrics", "read_metrics", "preprocessing_for",
           "transforms_for", "artifact_bytes", "check_memory", "job_identity"]
