"""Throughput of a mixed batch over N tasks (one MultiTask pass) vs a single-task batch of the same size (the
task's adapted model alone), per method. Timed in turns (load on the shared machine hits both alike), median.

    python benchmarks/multitask_throughput.py --backbone vistune/vit-tiny-cifar10 --tasks 8 --batch-size 32
    python benchmarks/multitask_throughput.py --backbone tf_efficientnet_lite0 --image-size 128 \\
        --methods linear,bias,ssf,lora,adapter
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import timeit_interleaved  # noqa: E402
from _tasks import make_tasks  # noqa: E402

METHODS = "linear,bias,ssf,vpt-deep,vpt-shallow,lora,dora,ia3,ln-tuning,adapter,sct,pro-tuning,partial,full"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vistune/vit-tiny-cifar10")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from vistune.artifacts import load_artifact
    from vistune.backbones import load_backbone
    from vistune.methods import METHODS as REGISTRY
    from vistune.multitask import MultiTask

    backbone = load_backbone(args.backbone)
    root = Path(tempfile.mkdtemp(prefix="vistune-mt-speed-"))
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    cpu = torch.device("cpu")
    print(f"backbone {args.backbone}, {args.image_size}px, batch {args.batch_size}, mixed over {args.tasks} tasks "
          f"(round robin), CPU {args.threads} thread(s), torch {torch.__version__}, median of {args.steps} after "
          f"{args.warmup} warm-up, shared 2-core machine under load from other users")
    print("| method | single task (img/s) | mixed batch (img/s) | mixed / single | trunk passes |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        if backbone.family not in REGISTRY[method].families:
            continue
        dirs = make_tasks(backbone, method, args.tasks, root, args.image_size)
        alone, _ = load_artifact(dirs[0], backbone=backbone)
        mt = MultiTask(backbone, dirs)
        names = [d.name for d in dirs]
        tasks = [names[i % len(names)] for i in range(args.batch_size)]
        passes = [0]
        first = next(iter(mt.trunk.model.children()))
        hook = first.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
        with torch.no_grad():
            mt(x, tasks)
            per_call, passes[0] = passes[0], 0
            hook.remove()
            t = timeit_interleaved({"single": lambda: alone(x), "mixed": lambda: mt(x, tasks)}, cpu, args.steps,
                                   args.warmup)
        single, mixed = args.batch_size / t["single"], args.batch_size / t["mixed"]
        runs = "own passes" if mt.describe()[0]["run"] == "own" else str(per_call)
        print(f"| {method} | {single:.0f} | {mixed:.0f} | {mixed / single:.2f} | {runs} |", flush=True)


if __name__ == "__main__":
    main()
