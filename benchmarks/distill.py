"""What distillation costs and what it saves: teacher-logit caching vs an online teacher, and teacher vs student.

1. Training time of `vistune distill` with the teacher's outputs cached (the teacher runs once per image, before
   the first epoch) and with the teacher run on every batch (``cache_teacher=false``, what ``--augment`` needs):
   the one-off teacher pass and the time per epoch (the median over the epochs; each epoch includes its val pass).
2. Inference latency of the teacher and of the student (each at its own input size), batch 1 and batch 32,
   median of ``--steps`` timed calls measured in turns (so a shared machine's load hits both alike).
3. Tuned parameters, total parameters and artifact bytes of the teacher and of the student.

The teacher is a vistune run folder; the student is trained here (``--epochs`` per mode, written to ``--work``).
Example (docs/benchmarks.md):

  python benchmarks/distill.py --teacher teachers/fashion-mnist --data fashion-mnist --student mobilenetv2_100 \
      --method linear --image-size 64
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--student", default="mobilenetv2_100")
    p.add_argument("--method", default="linear", help="the student's method")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="distill-bench-work")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from vistune.artifacts import artifact_bytes, load_artifact
    from vistune.backbones import load_backbone
    from vistune.bench.efficiency import timeit_interleaved
    from vistune.distill import DistillJob, run_distill
    from vistune.methods.procedures import procedure_config
    from vistune.run import Job, prepare_job, read_metrics
    from vistune.training import TrainConfig

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    backbone = load_backbone(args.student)

    def job(out: Path | None) -> Job:
        return Job(backbone=args.student, method=args.method, data=args.data, image_size=args.image_size,
                   train_size=args.train_size, val_size=args.val_size, test_size=args.batch_size,
                   out=None if out is None else str(out),
                   train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1.0, device="cpu"))

    data = prepare_job(job(None), backbone=backbone).data
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); shared with other jobs (load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())})")

    rows = {}
    for mode, cache in (("cached", True), ("online", False)):
        out = work / mode
        t0 = time.perf_counter()
        run_distill(DistillJob(job(out), args.teacher, procedure_config("distill", {"cache_teacher": cache})),
                    progress=False, backbone=backbone, data=data)
        wall = time.perf_counter() - t0
        metrics = read_metrics(out)
        epochs = [h["seconds"] for h in metrics["history"]]
        rows[mode] = {"epoch": statistics.median(epochs), "epochs": sum(epochs), "wall": wall}
    print(f"\n1. {args.student} + {args.method} distilled from {args.teacher} on {args.data} "
          f"({args.train_size} train / {args.val_size} val, {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs)")
    print("| teacher outputs | whole run s | of which epochs s | median s per epoch (train + val) |")
    print("|---|---|---|---|")
    for mode, r in rows.items():
        label = "cached (once per image)" if mode == "cached" else "online (every batch)"
        print(f"| {label} | {r['wall']:.1f} | {r['epochs']:.1f} | {r['epoch']:.1f} |")
    print("(whole run: loading the teacher, the student's feature / teacher pass, the epochs, the test and teacher "
          "evaluations; the cached run's teacher pass is in it, not in its epochs)")

    teacher, t_meta = load_artifact(args.teacher)
    student, s_meta = load_artifact(work / "cached", backbone=backbone)
    t_size, s_size = t_meta["preprocessing"]["image_size"], s_meta["preprocessing"]["image_size"]
    fns = {}
    for batch in (1, 32):
        xt, xs = torch.randn(batch, 3, t_size, t_size), torch.randn(batch, 3, s_size, s_size)
        fns[f"teacher b{batch}"] = (lambda m=teacher, x=xt: _infer(m, x))
        fns[f"student b{batch}"] = (lambda m=student, x=xs: _infer(m, x))
    times = timeit_interleaved(fns, torch.device("cpu"), args.steps, args.warmup)
    print(f"\n2. inference latency (ms, median of {args.steps} after {args.warmup} warm-up calls, fp32, "
          f"{torch.get_num_threads()} thread(s))")
    print("| model | input | batch 1 | batch 32 | batch 32 per image |")
    print("|---|---|---|---|---|")
    for who, meta, size in (("teacher", t_meta, t_size), ("student", s_meta, s_size)):
        b1, b32 = times[f"{who} b1"] * 1e3, times[f"{who} b32"] * 1e3
        print(f"| {who}: {meta['backbone']['name']} + {meta['method']} | {size} px | {b1:.1f} | {b32:.1f} | "
              f"{b32 / 32:.2f} |")

    print("\n3. size")
    print("| model | tuned params | total params (backbone + tuned) | artifact bytes |")
    print("|---|---|---|---|")
    for who, meta, path in (("teacher", t_meta, Path(args.teacher)), ("student", s_meta, work / "cached")):
        params = meta["parameters"]
        total = params["backbone_params"] + params["tuned_params"]
        print(f"| {who}: {meta['backbone']['name']} + {meta['method']} | {params['tuned_params']:,} | {total:,} | "
              f"{artifact_bytes(path):,} |")
    print(json.dumps({"train": rows, "latency_s": times}), file=sys.stderr)


@torch.no_grad()
def _infer(model, x):
    return model(x)


if __name__ == "__main__":
    main()
