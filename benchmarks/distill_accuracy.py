"""Does distillation help? A student trained with labels only vs the same student distilled from a teacher.

The same student backbone, method, budget (epochs, batch size, lr grid) and data (a stratified 800-train /
200-val subset, data seed 0; a fixed test subset) in three conditions:

- ``labels``      : `vistune train` (cross-entropy with the labels);
- ``kd``          : `vistune distill` from the teacher (default T=4, α=0.5) on the same 800 labelled images;
- ``kd+unlabelled``: the same plus ``--unlabelled-images`` images of the task's training split that are in neither
                    the 800 nor the 200 (written as PNG files to ``--work``/unlabelled-<task>, labels dropped).

Selection as in `vistune bench`: every lr of ``--lr-grid`` is trained with the first seed and scored on val (best
val epoch); the best lr is then trained with every seed (the first seed's run is that selection run). The table
gives mean ± std over the seeds of the val and test accuracy of the best-val epoch. The teacher must be a vistune
artifact trained on the same task and split (see docs/methods.md for the commands). Example:

  python benchmarks/distill_accuracy.py --task fashion-mnist --teacher teachers/fashion-mnist \
      --student mobilenetv2_100 --method linear --image-size 64 --test-size 1000
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def write_unlabelled(data, n: int, folder: Path, seed: int = 0) -> Path:
    """``n`` images of the training split's source that neither the train, the val nor the test split uses, as
    PNGs."""
    from PIL import Image

    train, val = data.train, data.val
    if not hasattr(train, "images") or getattr(val, "images", None) is not train.images:
        sys.exit("--unlabelled-images needs a built-in array data set whose val is carved from train")
    used = [train.indices, val.indices]
    if getattr(data.test, "images", None) is train.images:  # a source array that also holds test (digits, mnist5k)
        used.append(data.test.indices)
    unused = np.setdiff1d(np.arange(len(train.images)), np.concatenate(used))
    pick = np.random.default_rng(seed).choice(unused, size=min(n, len(unused)), replace=False)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.png"))
    if len(existing) != len(pick):
        for p in existing:
            p.unlink()
        for k, i in enumerate(sorted(pick)):
            a = train.images[i]
            Image.fromarray(a, "L" if a.ndim == 2 else "RGB").save(folder / f"{k:05d}.png")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="data spec (built-in: fashion-mnist, mnist5k, digits)")
    p.add_argument("--teacher", required=True, help="the teacher's run folder")
    p.add_argument("--student", default="mobilenetv2_100")
    p.add_argument("--method", default="linear")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-grid", default="0.5,2")
    p.add_argument("--seeds", default="42,44,82")
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--unlabelled-images", type=int, default=1600)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--conditions", default="labels,kd,kd+unlabelled")
    p.add_argument("--work", default="distill-work", help="folder for the unlabelled images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write every run's numbers to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from vistune.backbones import load_backbone
    from vistune.distill import DistillJob, run_distill
    from vistune.errors import TrainingDiverged
    from vistune.methods.procedures import procedure_config
    from vistune.run import Job, prepare_job, run_job
    from vistune.training import TrainConfig

    def job(lr: float, seed: int) -> Job:
        return Job(backbone=args.student, method=args.method, data=args.task, image_size=args.image_size,
                   train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                   train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, seed=seed, device="cpu",
                                     optimizer="sgd"))  # the recipe docs/methods.md's table was measured with

    lrs = [float(v) for v in args.lr_grid.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    backbone = load_backbone(args.student)
    data = prepare_job(job(lrs[0], seeds[0]), backbone=backbone).data  # loaded once, every run shares it
    unlabelled = write_unlabelled(data, args.unlabelled_images, Path(args.work) / f"unlabelled-{args.task}")
    config = procedure_config("distill", {"temperature": args.temperature, "alpha": args.alpha})

    def run(condition: str, lr: float, seed: int) -> dict:
        t0 = time.perf_counter()
        m, diverged = {"val_accuracy": None, "test_accuracy": None}, None
        try:
            if condition == "labels":
                m = run_job(job(lr, seed), progress=False, backbone=backbone, data=data)
            else:
                m = run_distill(DistillJob(job(lr, seed), args.teacher, config,
                                           str(unlabelled) if condition == "kd+unlabelled" else None),
                                progress=False, backbone=backbone, data=data)
        except TrainingDiverged as e:  # a too-high lr of the grid: a failed setting, never selected
            diverged = e.what
        row = {"condition": condition, "lr": lr, "seed": seed, "val": m["val_accuracy"], "test": m["test_accuracy"],
               "seconds": time.perf_counter() - t0,
               "teacher_test": m.get("distillation", {}).get("teacher_test_accuracy")}
        if diverged is not None:
            row["diverged"] = diverged
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    rows = []
    for condition in args.conditions.split(","):
        selection = [run(condition, lr, seeds[0]) for lr in lrs]
        best = max((r for r in selection if r["val"] is not None), key=lambda r: (r["val"], -r["lr"]))
        finals = [best] + [run(condition, best["lr"], s) for s in seeds[1:]]
        rows.append((condition, best["lr"], finals, selection))

    def mean_std(values):
        return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

    teacher_test = next((f[0]["teacher_test"] for _, _, f, _ in rows if f[0]["teacher_test"] is not None), None)
    print(f"\n{args.task}: student {args.student} + {args.method} at {args.image_size} px, {args.train_size} train / "
          f"{args.val_size} val, {args.epochs} epochs, lr grid {lrs} (val-selected), seeds {seeds}; teacher "
          f"{args.teacher} (test accuracy {teacher_test})")
    print("| condition | selected lr | val accuracy | test accuracy | s per run |")
    print("|---|---|---|---|---|")
    for condition, lr, finals, selection in rows:
        seconds = statistics.fmean(r["seconds"] for r in finals + selection)
        print(f"| {condition} | {lr:g} | {mean_std([r['val'] for r in finals])} | "
              f"{mean_std([r['test'] for r in finals])} | {seconds:.0f} |")
    for condition, _, _, selection in rows:
        failed = [f"{r['lr']:g}" for r in selection if r["val"] is None]
        if failed:
            print(f"{condition}: diverged at lr {', '.join(failed)} (stopped by the divergence check; not selectable)")
    if args.json:
        Path(args.json).write_text(json.dumps([{"condition": c, "lr": lr, "runs": f, "selection": s}
                                               for c, lr, f, s in rows], indent=1))


if __name__ == "__main__":
    main()
