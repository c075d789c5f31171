"""Transfer comparison: every method on several tasks in the VTAB-1k protocol, lr selected on val.

For each task × method: train on 800 images for each base lr of the grid, keep the lr with the best
val-200 accuracy (never test), report that run's test top-1. One seed (--seed). A row
"linear (random init)" probes a random-weight copy of the same architecture: the gap to "linear"
is what the pretraining gives.

Example (the table in docs/backbones.md, on a GPU, tasks run in parallel processes):
  python benchmarks/transfer.py --backbone vistune/vit-tiny-cifar10 \
      --tasks fashion-mnist,mnist5k,digits,shapes-loc,shapes-ori,clevr-count \
      --methods linear,full,partial-1,mlp-3,bias,adapter,vpt-shallow,vpt-deep --random-init-baseline

``--lr-grid default`` trains each method once, at its own default lr (a reduced protocol for a CPU); each task's
process uses $OMP_NUM_THREADS threads (default 2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SGD_GRID = [0.1, 0.5, 2.0]
ADAMW_GRIDS = {"full": [3e-4, 1e-3], "sct": [3e-3, 1e-2, 3e-2]}  # other AdamW methods: their default × {¼, 1, 4}


def lr_grid(method: str, grid: str) -> list[float | None]:
    """The base lrs to try: ``--lr-grid default`` = the method's own default only (None), else the protocol's."""
    from vistune.methods import resolve_method
    from vistune.training import TrainConfig

    if grid == "default":
        return [None]
    cls = resolve_method(method)[0].method_class
    if cls.default_optimizer == "sgd":
        return SGD_GRID
    if method in ADAMW_GRIDS:
        return ADAMW_GRIDS[method]
    base = cls.default_lrs.get("adamw", TrainConfig.DEFAULT_LR["adamw"])
    return [base / 4, base, base * 4]


def run_task(args) -> list[dict]:
    from vistune.backbones import load_backbone
    from vistune.data import load_data
    from vistune.errors import TrainingDiverged
    from vistune.run import Job, preprocessing_for, run_job, transforms_for
    from vistune.training import TrainConfig

    rows = []
    variants = [("linear (random init)", "linear", True)] if args.random_init_baseline else []
    variants += [(m, m, False) for m in args.methods.split(",")]
    backbones = {}
    data = None
    for label, method, random_init in variants:
        if random_init not in backbones:
            backbones[random_init] = load_backbone(args.backbone, random_init=random_init)
        backbone = backbones[random_init]
        probe = Job(backbone=args.backbone, method=method, data=args.task, image_size=args.image_size)
        if data is None:
            train_tf, eval_tf = transforms_for(preprocessing_for(backbone, probe))
            data = load_data(args.task, train_transform=train_tf, eval_transform=eval_tf, train_size=800,
                             val_size=200, test_size=args.test_size, seed=args.seed)
        grid = lr_grid(method, args.lr_grid)
        best = None
        for lr in grid:
            job = Job(backbone=args.backbone, method=method, data=args.task, random_init=random_init,
                      image_size=args.image_size,
                      train=TrainConfig(epochs=args.epochs, batch_size=32, lr=lr, seed=args.seed,
                                        device=args.device))  # the method's default optimizer: lr_grid follows it
            try:
                m = run_job(job, backbone=backbone, data=data, progress=False)
            except TrainingDiverged as e:  # a diverged grid point is a failed setting, not a failed sweep
                print(f"{args.task} {label} lr={lr}: {e.what}", file=sys.stderr)
                continue
            model = m.pop("model")
            if best is None or m["val_accuracy"] > best["val_accuracy"]:
                best = {**m, "lr": job.train.base_lr(model)}  # the base lr it ran with (its default for None)
        rows.append({"task": args.task, "method": label, "val": best["val_accuracy"], "test": best["test_accuracy"],
                     "lr": best["lr"], "tuned_params": best["tuned_params"],
                     "tuned_params_excluding_head": best["tuned_params_excluding_head"],
                     "backbone_params": best["backbone_params"], "train_seconds": best["train_seconds"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vistune/vit-tiny-cifar10")
    p.add_argument("--tasks", default="fashion-mnist,mnist5k,digits,shapes-loc,shapes-ori,clevr-count")
    p.add_argument("--methods", default="linear,full,partial-1,mlp-3,bias,adapter,vpt-shallow,vpt-deep")
    p.add_argument("--random-init-baseline", action="store_true")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr-grid", choices=["protocol", "default"], default="protocol",
                   help="protocol: select the lr on val from the grid (SGD 0.1/0.5/2.0, AdamW methods: their "
                        "default × ¼, 1, 4, or the listed grids); default: each method's own default lr only "
                        "(a reduced protocol)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--task", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--json-out", help="also write all rows as JSON here")
    args = p.parse_args()
    if args.task:
        print(json.dumps(run_task(args)))
        return
    t0 = time.time()
    procs = {}
    for task in args.tasks.split(","):
        cmd = [sys.executable, __file__, "--task", task] + sys.argv[1:]
        procs[task] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    rows = []
    for task, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"{task}: failed (exit {proc.returncode})", file=sys.stderr)
            continue
        rows += json.loads(out.strip().splitlines()[-1])
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    _print(rows, args, time.time() - t0)


def _print(rows, args, seconds):
    tasks = [t for t in args.tasks.split(",") if any(r["task"] == t for r in rows)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    selected = "each method's default lr" if args.lr_grid == "default" else "the val-selected lr"
    print(f"\n{args.backbone}: test top-1 (%) of {selected}, 800 train / 200 val / ≤{args.test_size} "
          f"test, {args.epochs} epochs, seed {args.seed}; {seconds / 60:.1f} min wall")
    print("| method | tuned params (excl. head) | " + " | ".join(tasks) + " | mean |")
    print("|---|---:|" + "---:|" * (len(tasks) + 1))
    for m in methods:
        cells = {r["task"]: r for r in rows if r["method"] == m}
        accs = [100 * cells[t]["test"] for t in tasks if t in cells]
        tuned = next(iter(cells.values()))["tuned_params_excluding_head"]
        print(f"| {m} | {tuned:,} | " + " | ".join(f"{100 * cells[t]['test']:.1f}" if t in cells else "-"
                                                  for t in tasks) + f" | {sum(accs) / len(accs):.1f} |")


if __name__ == "__main__":
    main()
