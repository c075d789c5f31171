"""The efficiency protocol of `vistune bench`: one measurement, the same for every method × backbone.

:func:`measure_efficiency` builds the adapted model as training does (``adapt`` with ``make_config``,
then the method's data-dependent ``prepare``, e.g. SCT's calibration, on the synthetic batch) and
times, on seeded random images and labels:

- training: one step of forward, cross-entropy, backward and SGD-momentum update of the whole adapted
  model (the trainer's autocast default: bf16 on CUDA, fp32 on CPU); median over ``steps`` after
  ``warmup``. SGD for every method, so that they compare on equal terms (the trainer's default for full
  and sct is AdamW, whose second moment adds one more tuned-parameter-sized buffer). Head-only methods
  (linear, mlp) are timed through the backbone too: that is their cost with augmentation; without it the
  trainer caches the frozen features and trains the head alone;
- peak memory of those training steps: CUDA max allocated, or on a CPU the process's peak resident memory
  (VmHWM on Linux), which includes the Python + torch baseline and all the process did before;
- inference latency in eval mode without gradients at batch 1 and at ``batch_size``.

:func:`measure_in_subprocess` runs it in a fresh child process (``python -m vistune.bench.efficiency``),
so that peak memory is that configuration's own and every method starts from the same clean process.

:mod:`benchmarks._harness` uses the timing helpers here too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset

from ..backbones import BackboneView, load_backbone
from ..errors import VistuneError
from ..methods import Method, adapt, count_parameters, make_config
from ..run import peak_memory_mb
from ..training.trainer import _autocast, resolve_device

SEED = 0  # method initialisation, images and labels: every configuration sees the same inputs
PEAK_MEMORY_KIND = {"cuda": "cuda-max-allocated", "cpu": "process-peak-rss"}
STDERR_TAIL = 2000  # characters of a failed child's stderr quoted in the error


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    return timeit_interleaved({"fn": fn}, device, steps, warmup)["fn"]


def timeit_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, steps: int,
                       warmup: int) -> dict[str, float]:
    """Median seconds of several functions measured in turns, so that load from other processes on a
    shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def autocast(device: torch.device):
    """The trainer's default precision: bf16 autocast on CUDA, plain fp32 on CPU (where bf16 is slower)."""
    return _autocast(device, None)


def sgd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """One training step of ``model`` (forward, cross-entropy, backward, SGD momentum step), as a closure."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def device_name(device: torch.device) -> str:
    """"cpu", or the GPU's name (e.g. "NVIDIA H100 80GB HBM3")."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _check_sizes(batch_size: int, steps: int, warmup: int) -> None:
    if batch_size < 2:
        raise VistuneError(f"efficiency: batch_size={batch_size} must be ≥ 2",
                           "BatchNorm layers that train need more than one image; use e.g. 32")
    if steps < 1 or warmup < 0:
        raise VistuneError(f"efficiency: steps={steps} must be ≥ 1 and warmup={warmup} ≥ 0")


def _build(backbone: BackboneView, method: str, options: dict, num_classes: int, image_size: int,
           x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Method:
    """The adapted model as `run_job` builds it, prepared on the synthetic batch instead of the training set."""
    model = adapt(backbone, make_config(method, options, image_size=image_size), num_classes)
    # data-dependent set-up (SCT's channel calibration): its cost does not depend on which channels it picks
    model.prepare(TensorDataset(x, y), device=device, batch_size=len(x), progress=False)
    return model.to(device)


def measure_efficiency(backbone: BackboneView, method: str, options: dict, num_classes: int, *, image_size: int,
                       batch_size: int, device: str = "auto", steps: int = 10, warmup: int = 3) -> dict:
    """Training speed, training peak memory and inference latency of ``method`` on ``backbone``.

    ``backbone`` is left bit-identical (``adapt`` trains copies of the tensors it tunes). Keys:
    train_step_ms, train_images_per_s, peak_memory_mb, peak_memory_kind, latency_b1_ms, latency_bn_ms,
    tuned_params, device, batch_size, image_size, steps, warmup, torch_threads."""
    _check_sizes(batch_size, steps, warmup)
    dev = resolve_device(device)
    # the caller's random state stays as it was (the method's init, the inputs and dropout draw from it)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(SEED)
        x = torch.randn(batch_size, 3, image_size, image_size)
        y = torch.randint(0, num_classes, (batch_size,))
        model = _build(backbone, method, options, num_classes, image_size, x, y, dev)
        x, y = x.to(dev), y.to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        step_seconds = timeit(sgd_step(model, x, y, dev), dev, steps, warmup)
        peak = peak_memory_mb(dev)  # read before inference, so that it is training's peak
        model.eval()
        with torch.no_grad(), autocast(dev):
            latency = timeit_interleaved({"b1": lambda: model(x[:1]), "bn": lambda: model(x)}, dev, steps, warmup)
    return {
        "train_step_ms": 1000 * step_seconds,
        "train_images_per_s": batch_size / step_seconds,
        "peak_memory_mb": peak,
        "peak_memory_kind": PEAK_MEMORY_KIND[dev.type],
        "latency_b1_ms": 1000 * latency["b1"],
        "latency_bn_ms": 1000 * latency["bn"],
        "tuned_params": count_parameters(model)["tuned_params"],
        "device": device_name(dev),
        "batch_size": batch_size,
        "image_size": image_size,
        "steps": steps,
        "warmup": warmup,
        "torch_threads": torch.get_num_threads(),
    }


def backbone_spec_of(backbone: BackboneView) -> dict:
    """What :func:`load_backbone` needs to rebuild ``backbone`` in another process (its ``spec``)."""
    spec = backbone.spec
    try:
        json.dumps(spec.model_kwargs)
    except TypeError as e:
        raise VistuneError(
            f"backbone {spec.name!r} was built with timm options that cannot be passed to a child process ({e})",
            "give model_kwargs as plain values (numbers, strings, lists), or measure in-process with "
            "measure_efficiency",
        ) from None
    return {"name": spec.name, "checkpoint": spec.checkpoint, "random_init": spec.source == "random-init",
            "model_kwargs": dict(spec.model_kwargs)}


def measure_in_subprocess(backbone_spec: dict, method: str, options: dict, num_classes: int, *, image_size: int,
                          batch_size: int, device: str = "auto", steps: int = 10, warmup: int = 3,
                          timeout: float = 1800) -> dict:
    """:func:`measure_efficiency` in a fresh child process that loads the backbone from ``backbone_spec``
    (``{"name", "checkpoint", "random_init", "model_kwargs"}``, see :func:`backbone_spec_of`)."""
    make_config(method, options)  # a bad method name or option fails here, before a child starts
    _check_sizes(batch_size, steps, warmup)
    request = {"backbone": backbone_spec, "method": method, "options": options, "num_classes": num_classes,
               "image_size": image_size, "batch_size": batch_size, "device": device, "steps": steps,
               "warmup": warmup}
    what = f"efficiency measurement of {method!r} on backbone {backbone_spec['name']!r}"
    try:
        child = subprocess.run([sys.executable, "-m", "vistune.bench.efficiency", "--json", json.dumps(request)],
                               capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VistuneError(f"{what} took longer than {timeout:.0f} s",
                           "raise the timeout, or measure with fewer steps or a smaller batch") from None
    if child.returncode != 0:
        raise VistuneError(f"{what} failed (child process exit status {child.returncode}):\n"
                           f"{child.stderr[-STDERR_TAIL:].rstrip()}")
    try:
        return json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise VistuneError(f"{what}: the child process printed no result line:\n{child.stdout[-STDERR_TAIL:]}"
                           f"\n{child.stderr[-STDERR_TAIL:]}") from None


def main(argv: list[str] | None = None) -> int:
    """Child mode of :func:`measure_in_subprocess`: one measurement, printed as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m vistune.bench.efficiency", description=main.__doc__)
    parser.add_argument("--json", required=True, help="the request that measure_in_subprocess writes")
    request = json.loads(parser.parse_args(argv).json)
    try:
        backbone = load_backbone(**request.pop("backbone"))
        print(json.dumps(measure_efficiency(backbone, **request)))
    except VistuneError as e:  # the user's error, without a traceback (the parent quotes stderr)
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
