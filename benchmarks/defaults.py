"""Do the methods' default training settings learn? Each default vs the best lr of a grid (docs/defaults.md).

For every task × backbone × method: a run with the method's defaults (no --lr, --optimizer or --warmup-epochs)
and runs over an lr grid with the method's default optimizer: for SGD methods VPT's grid {50, 25, 10, 5, 2.5, 1,
0.5, 0.25, 0.1, 0.05}, for AdamW methods {0.5, 0.2, 0.1, 0.05, 0.02, …, 0.0002, 0.0001} (both × batch/256). Same data,
epochs and seed; the score is the best val accuracy over the epochs (what `vistune train` selects). The default
passes when it reaches ≥ 90 % of the best grid point's val accuracy. A default lr that is a grid point is that
grid point's run (the same computation: the default optimizer, lr and warm-up).

Cheap by design (a 2-core CPU): small stratified subsets, 64-px CNN inputs (the ViT at its native 32 px), few
epochs, one torch thread, the feature cache for head-only methods, the decoded images shared by all runs of a
task, and a run whose loss explodes stops within a few steps (TrainingDiverged: a failed grid point). The grid
is not run point by point: ``--search climb`` (default) runs the grid point nearest the default lr, then climbs
from the best point run so far towards better val accuracy until both neighbours of the best point have run and
are worse — and, while that best is under 0.8 × the linear probe's best on the same cell (a collapsed high-lr
plateau), on to lower lrs (a cell whose climb was interrupted before that is marked "climb unfinished"); ``--search full`` runs
every point from the highest lr down, stopping once two lower lrs in a row are each ≥ 5 points below the best.
Results are appended to a JSON-lines file, one run per line, and finished runs are never redone (but for a run
of a method's defaults made before its default lr changed), so the benchmark can run in pieces (e.g. one backbone
or method per invocation) and the table is printed from the file (``--table-only``). clevr-count scores every
setting by its mean over training seeds 0, 1 and 2 (``TASK_SEEDS``; ``--seeds`` overrides it for every task).
``--extra-lrs`` also runs base lrs between the grid points (candidates for a default, with the default
optimizer): they never count as a cell's best, and once a default moves to one, that run is the default's run.

Examples (docs/defaults.md has the exact commands of its table):
  python benchmarks/defaults.py --backbones tf_efficientnet_lite0 --tasks fashion-mnist --methods ssf \\
      --results docs/results/defaults.jsonl
  python benchmarks/defaults.py --table-only --results docs/results/defaults.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

SGD_GRID = [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]  # VPT's base lrs (× batch/256)
# 0.5 and 0.2 were added after the own ViT's best lr sat at the old top, 0.1, in most of its AdamW cells
ADAMW_GRID = [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001]
GRIDS = {"sgd": SGD_GRID, "adamw": ADAMW_GRID}
PASS_RATIO = 0.9
# clevr-count at this size is dominated by seed noise (full on MobileNetV2, val at one lr: 0.255 / 0.385 / 0.300
# with seeds 0 / 1 / 2): each of its grid points and its default is the mean over three training seeds
TASK_SEEDS = {"clevr-count": (0, 1, 2)}
FLOOR_RATIO = 0.8  # the climb does not stop while a method's best is under this fraction of the linear probe's
FULL_PRUNE = 0.05  # --search full: stop below the peak after two lrs in a row this far under the best
CNN_IMAGE_SIZE = 64


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="tf_efficientnet_lite0,mobilenetv2_100,vistune/vit-tiny-cifar10")
    p.add_argument("--tasks", default="digits,mnist5k,fashion-mnist,clevr-count")
    p.add_argument("--methods", default="all", help="comma-separated, or all (every registered method)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=240)
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds; each grid point and the default score the mean val accuracy "
                        "over them (default: 0, and 0,1,2 on clevr-count, whose seed noise is larger than the 10%% "
                        "margin)")
    p.add_argument("--search", choices=["climb", "full", "none"], default="climb",
                   help="how much of the grid to run (none: only the default runs)")
    p.add_argument("--auto", action="store_true", help="also run each method with --lr auto")
    p.add_argument("--extra-lrs", default="",
                   help="comma-separated base lrs off the grid to run too, with the method's default optimizer: "
                        "candidates for a default between two grid points (they never count as the grid's best)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="grid with this optimizer instead of the method's default (exploration; no default run)")
    p.add_argument("--results", default="defaults-results.jsonl", help="JSON-lines file of finished runs")
    p.add_argument("--table-only", action="store_true", help="print the table from --results, run nothing")
    p.add_argument("--measured-only", action="store_true",
                   help="table: leave out method × backbone rows without a measured cell (they are listed after it)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args()


def image_size(backbone_view) -> int:
    """64 px for CNNs (cheap), the pretrained size (32 px) for vistune's own ViT."""
    # the CNNs here have no transformer view: timm's generic one (before it, the "cnn" family)
    cnn = backbone_view.family == "generic"
    return CNN_IMAGE_SIZE if cnn else backbone_view.model.pretrained_cfg["input_size"][-1]


class Results:
    """Finished runs, one JSON object per line; a run is identified by its settings (``key``)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with self.path.open("a") as f:  # one line per finished run: an interruption loses at most the current run
            f.write(json.dumps(row) + "\n")


def seeds_for(args, task: str) -> tuple[int, ...]:
    if args.seeds is not None:
        return tuple(int(s) for s in args.seeds.split(","))
    return TASK_SEEDS.get(task, (0,))


def settings_key(args, backbone: str, task: str, method: str, optimizer: str | None, lr, seed: int) -> str:
    if isinstance(lr, float) and lr.is_integer():
        lr = int(lr)  # a default of 1.0 is the grid's 1: one key (JSON writes 1.0 and 1 differently)
    return json.dumps([backbone, task, method, optimizer, lr, args.epochs, args.batch_size, args.train_size,
                       args.val_size, seed])


def run_point(args, results: Results, backbone, task: str, data, method: str, optimizer: str | None, lr,
              default_lr: float | None = None) -> dict:
    """One setting over the task's seeds: a row of the mean (see :func:`mean_row`). ``default_lr``: the default
    this run of the method's defaults must have used (see :func:`stale`)."""
    return mean_row([run_one(args, results, backbone, task, data, method, optimizer, lr, seed, default_lr)
                     for seed in seeds_for(args, task)])


def stale(row: dict, default_lr: float | None) -> bool:
    """A run of the method's defaults (its key has no lr) made before the default lr changed."""
    return default_lr is not None and row["status"] == "ok" and not math.isclose(row["base_lr"], default_lr)


def mean_row(rows: list[dict]) -> dict:
    """The seeds' runs of one setting as one row: the mean val accuracy, a diverged seed counted as 0 (status
    "diverged" only when every seed diverged)."""
    if len(rows) == 1:
        return rows[0]
    ok = [r for r in rows if r["status"] == "ok"]
    out = dict(ok[0] if ok else rows[0], seeds=len(rows))
    if ok:
        out["val_accuracy"] = sum(r["val_accuracy"] for r in ok) / len(rows)
    return out


def run_one(args, results: Results, backbone, task: str, data, method: str, optimizer: str | None, lr,
            seed: int, default_lr: float | None = None):
    """One training run (``optimizer``/``lr`` None: the method's default; lr "auto": the search), cached."""
    from vistune.errors import TrainingDiverged
    from vistune.run import Job, run_job
    from vistune.training import TrainConfig

    key = settings_key(args, backbone.spec.name, task, method, optimizer, lr, seed)
    if key in results.rows and not stale(results.rows[key], default_lr):
        return results.rows[key]
    job = Job(backbone=backbone.spec.name, method=method, data=task, image_size=image_size(backbone),
              train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=optimizer,
                                device="cpu", seed=seed))
    t0 = time.perf_counter()
    row = {"key": key, "backbone": backbone.spec.name, "task": task, "method": method, "optimizer": optimizer,
           "lr": lr, "epochs": args.epochs, "seed": seed}
    try:
        m = run_job(job, backbone=backbone, data=data, progress=False)
        row.update(status="ok", val_accuracy=m["val_accuracy"], best_epoch=m["best_epoch"],
                   base_lr=m["train_config"]["base_lr"], resolved_optimizer=m["train_config"]["optimizer"],
                   train_loss=[h["train_loss"] for h in m["history"]], lr_search=m["lr_search"])
    except TrainingDiverged as e:
        row.update(status="diverged", val_accuracy=None, reason=e.what)
    row["seconds"] = time.perf_counter() - t0
    results.add(row)
    score = "diverged" if row["status"] != "ok" else f"val {row['val_accuracy']:.3f}"
    setting = f"opt={optimizer or 'default'} lr={lr if lr is not None else 'default'} seed={seed}"
    print(f"  {task} {backbone.spec.name} {method} {setting}: {score} ({row['seconds']:.0f} s)", file=sys.stderr,
          flush=True)
    return row


def score(row) -> float:
    return row["val_accuracy"] if row["status"] == "ok" else -math.inf


def nearest(grid: list[float], lr: float) -> int:
    return min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / lr)))


def climb(run, grid: list[float], start: int, known: dict[int, float], floor: float | None = None) -> None:
    """Run grid point ``start`` (the default's), then climb from the best point run so far (``known``: earlier
    invocations' results) towards better val accuracy until both neighbours of the best have run. While the best
    is below ``floor`` (what the linear probe alone reaches on the cell, × FLOOR_RATIO) the climb goes on to lower
    lrs: a method that trains a head and ends far below the head alone sits on a plateau of collapsed high-lr runs,
    where both neighbours being worse says nothing (ln-tuning on MobileNetV2: 0.235 at 0.1, 0.195 at 0.05, 0.800
    at 0.02)."""
    done = dict(known)
    if start not in done:
        done[start] = score(run(grid[start]))
    while True:
        ok = [i for i, s in done.items() if s > -math.inf]
        if not ok:  # everything so far diverged: go to lower lrs (higher indices)
            nxt = max(done) + 1
            if nxt >= len(grid):
                return
            done[nxt] = score(run(grid[nxt]))
            continue
        best = max(ok, key=lambda i: (done[i], i))
        todo = [j for j in (best - 1, best + 1) if 0 <= j < len(grid) and j not in done]
        if not todo:
            lower = max(done) + 1
            if floor is None or done[best] >= floor or lower >= len(grid):
                return
            todo = [lower]
        for j in todo:
            done[j] = score(run(grid[j]))


def full(run, grid: list[float]) -> None:
    """Every grid point from the highest lr down, pruned two points below the peak (see FULL_PRUNE)."""
    best, below = -math.inf, 0
    for lr in grid:
        s = score(run(lr))
        if s > best:
            best, below = s, 0
        elif best > -math.inf and s < best - FULL_PRUNE:
            below += 1
            if below == 2:
                return
        else:
            below = 0


def point_row(results: Results, args, backbone: str, task: str, method: str, optimizer: str | None, lr):
    """The mean row of a setting whose every seed has run (None: not all have)."""
    rows = [results.rows.get(settings_key(args, backbone, task, method, optimizer, lr, seed))
            for seed in seeds_for(args, task)]
    return mean_row(rows) if all(r is not None for r in rows) else None


def grid_rows(results: Results, args, backbone: str, task: str, method: str, optimizer: str) -> dict[float, dict]:
    out = {}
    for lr in GRIDS[optimizer]:
        row = point_row(results, args, backbone, task, method, optimizer, lr)
        if row is not None:
            out[lr] = row
    return out


def load_task(backbone, task: str, args):
    from vistune.bench.data_cache import maybe_cache
    from vistune.data import load_data
    from vistune.run import Job, preprocessing_for, transforms_for

    size = image_size(backbone)
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, Job(backbone=backbone.spec.name, method="linear",
                                                                       data=task, image_size=size)))
    data = load_data(task, train_transform=train_tf, eval_transform=eval_tf, train_size=args.train_size,
                     val_size=args.val_size, data_seed=0)
    return dataclasses.replace(data, train=maybe_cache(data.train, size, False), val=maybe_cache(data.val, size, False),
                               test=None)


def refusal(backbone, method: str) -> str | None:
    """Why ``adapt`` refuses ``method`` on ``backbone`` (None: it runs): a family the method does not support, or
    no module it can take (peft's VeRA/OFT/BOFT/FourierFT layers take nn.Linear only, and a CNN such as MobileNetV2
    calls none), as docs/backbones.md's support table records."""
    from vistune.errors import VistuneError
    from vistune.methods import adapt, make_config

    try:
        adapt(backbone, make_config(method, image_size=image_size(backbone)), num_classes=2)
    except VistuneError as e:
        return e.what
    return None


def methods_for(args, backbone) -> tuple[list[str], list[tuple[str, str]]]:
    from vistune.methods import METHODS

    names = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    run, skipped = [], []
    for name in names:
        why = refusal(backbone, name)
        if why is None:
            run.append(name)
        else:
            skipped.append((name, why))
    return run, skipped


def run_all(args, results: Results) -> None:
    import torch

    from vistune.backbones import load_backbone
    from vistune.methods import METHODS
    from vistune.training import TrainConfig

    torch.set_num_threads(args.threads)
    for backbone_name in args.backbones.split(","):
        backbone = load_backbone(backbone_name)
        names, skipped = methods_for(args, backbone)
        for name, why in skipped:
            print(f"skip {name} on {backbone_name}: {why}", file=sys.stderr)
        for task in args.tasks.split(","):
            data = load_task(backbone, task, args)
            for method in names:
                cls = METHODS[method].method_class  # the defaults are class attributes (the Method contract)
                cfg = TrainConfig(optimizer=args.optimizer)
                optimizer, default_lr = cfg.resolved_optimizer(cls), cfg.default_lr(cls, backbone.family)
                grid = GRIDS[optimizer]

                def run(lr, method=method, optimizer=optimizer):
                    return run_point(args, results, backbone, task, data, method, optimizer, lr)

                if args.search == "climb":
                    known = {grid.index(lr): score(row) for lr, row in
                             grid_rows(results, args, backbone_name, task, method, optimizer).items()}
                    climb(run, grid, nearest(grid, default_lr), known,
                          linear_floor(results, args, backbone_name, task))
                elif args.search == "full":
                    full(run, grid)
                for lr in extra_lrs(args):
                    run(lr)
                if args.optimizer is None:
                    if default_row(results, args, backbone_name, task, method, optimizer, default_lr) is None:
                        if default_lr in grid:  # --search none
                            run(default_lr)
                        else:
                            run_point(args, results, backbone, task, data, method, None, None, default_lr)
                    if args.auto:
                        run_point(args, results, backbone, task, data, method, None, "auto")


def extra_lrs(args) -> list[float]:
    return [float(lr) for lr in args.extra_lrs.split(",") if lr.strip()]


def default_row(results: Results, args, backbone: str, task: str, method: str, optimizer: str, default_lr: float):
    """The run of the method's defaults; a default on the grid, or one that ran as an ``--extra-lrs`` candidate,
    is that setting's run (the same computation)."""
    row = point_row(results, args, backbone, task, method, optimizer, default_lr)
    if default_lr in GRIDS[optimizer] or row is not None:
        return row
    row = point_row(results, args, backbone, task, method, None, None)
    return None if row is None or stale(row, default_lr) else row


def linear_floor(results: Results, args, backbone: str, task: str) -> float | None:
    """FLOOR_RATIO × the best val accuracy of the linear probe's grid on the cell (None: not run)."""
    ok = [r["val_accuracy"] for r in grid_rows(results, args, backbone, task, "linear", "adamw").values()
          if r["status"] == "ok"]
    return FLOOR_RATIO * max(ok) if ok else None


def climb_finished(grid: list[float], run: dict[float, dict], best_lr: float, floor: float | None = None) -> bool:
    """Have both grid neighbours of the best point run (or is it at an end of the grid), and — when the best is
    below ``floor`` (see :func:`climb`) — every lower lr?"""
    i = grid.index(best_lr)
    if not all(grid[j] in run for j in (i - 1, i + 1) if 0 <= j < len(grid)):
        return False
    best = run[best_lr]["val_accuracy"]
    return floor is None or best >= floor or all(lr in run for lr in grid[i:])


def cell(results: Results, args, backbone: str, task: str, method: str, optimizer: str, default_lr: float):
    """(text, ratio or None): default val / best grid val @ its lr = ratio, or why there is no verdict."""
    grid = grid_rows(results, args, backbone, task, method, optimizer)
    d = default_row(results, args, backbone, task, method, optimizer, default_lr)
    ok = {lr: r for lr, r in grid.items() if r["status"] == "ok"}
    if d is None or not ok:
        return "not run", None
    best_lr = max(ok, key=lambda lr: (ok[lr]["val_accuracy"], -lr))
    best = ok[best_lr]["val_accuracy"]
    dv = d["val_accuracy"] if d["status"] == "ok" else 0.0
    ratio = dv / best if best > 0 else 0.0
    text = f"{dv:.3f} / {best:.3f} @ {best_lr:g} = {ratio:.2f}" if d["status"] == "ok" else \
        f"diverged / {best:.3f} @ {best_lr:g}"
    if d.get("seeds", 1) > 1:
        text += f" (mean of {d['seeds']} seeds)"
    if ratio < PASS_RATIO:
        text += " **FAIL**"
    if not climb_finished(GRIDS[optimizer], grid, best_lr, linear_floor(results, args, backbone, task)):
        text += f" (climb unfinished: {len(grid)} lr{'s' if len(grid) > 1 else ''})"
        if ratio >= PASS_RATIO:  # a better lr may not have run yet: no verdict (a failure stays one)
            ratio = None
    auto = point_row(results, args, backbone, task, method, None, "auto")
    if auto is not None:
        text += (f"; auto {auto['val_accuracy']:.3f} @ {auto['base_lr']:g}" if auto["status"] == "ok"
                 else "; auto diverged")
    return text, ratio


def print_table(args, results: Results) -> None:
    from vistune.backbones import load_backbone
    from vistune.methods import METHODS
    from vistune.training import TrainConfig

    backbones = args.backbones.split(",")
    tasks = args.tasks.split(",")
    names = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    views = {b: load_backbone(b) for b in backbones}
    print(f"\nDefault settings vs the best lr of the grid: val accuracy (best epoch), {args.train_size} train / "
          f"{args.val_size} val images, {args.epochs} epochs, batch {args.batch_size}, "
          f"training seeds {', '.join(f'{t} {list(seeds_for(args, t))}' for t in tasks)} (a setting scores its "
          f"seeds' mean); "
          f"ratio = default / best grid (pass ≥ {PASS_RATIO:.0%})\n")
    print("| method | defaults | backbone | " + " | ".join(tasks) + " |")
    print("|---|---|---|" + "---|" * len(tasks))
    ratios: dict[str, list[float]] = {}
    failures, unmeasured, refused = [], [], []
    for method in names:
        cls = METHODS[method].method_class  # the defaults are class attributes (the Method contract)
        optimizer = cls.default_optimizer
        for backbone in backbones:
            default_lr = TrainConfig().default_lr(cls, views[backbone].family)
            defaults = f"{optimizer} {default_lr:g}, warm-up {cls.default_warmup_fraction:.0%}"
            if refusal(views[backbone], method) is not None:
                refused.append(f"{method} × {backbone}")
                if args.measured_only:
                    continue
                print(f"| {method} | {defaults} | {backbone} | " + " | ".join("refused" for _ in tasks) + " |")
                continue
            cells = []
            for task in tasks:
                text, ratio = cell(results, args, backbone, task, method, optimizer, default_lr)
                cells.append(text)
                if ratio is not None:
                    ratios.setdefault(method, []).append(ratio)
                    if ratio < PASS_RATIO:
                        failures.append(f"{method} on {task} × {backbone}: {text}")
            if args.measured_only and all(c == "not run" for c in cells):
                unmeasured.append(f"{method} × {backbone}")
                continue
            print(f"| {method} | {defaults} | {backbone} | " + " | ".join(cells) + " |")
    if unmeasured:
        print(f"\nnot measured (no cell): {', '.join(unmeasured)}")
    if refused:
        print(f"\nrefused (the method does not run on that backbone; docs/backbones.md): {', '.join(refused)}")
    seconds = sum(row.get("seconds", 0.0) for row in results.rows.values())
    print(f"\ncells: default val / best grid val @ its base lr = ratio. {len(results.rows)} runs in {args.results}, "
          f"{seconds / 3600:.2f} h of run time in all (one torch thread each).\n")
    print("| method | cells with a verdict | lowest ratio |\n|---|---|---|")
    for method in names:
        r = ratios.get(method, [])
        print(f"| {method} | {len(r)} | " + (f"{min(r):.2f}" if r else "-") + " |")
    if failures:
        print(f"\nbelow {PASS_RATIO:.0%} of the best grid point ({len(failures)}):")
        for f in failures:
            print(f"- {f}")


def main():
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = Results(args.results)
    if not args.table_only:
        run_all(args, results)
    print_table(args, results)


if __name__ == "__main__":
    main()
