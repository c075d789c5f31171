"""Peak memory: N tasks served from one frozen backbone (vistune.multitask.MultiTask) vs N separate adapted models
(each loaded with its own backbone), N = 1, 4, 16, 64. Every configuration runs in a fresh child process (VmHWM:
its own peak RSS) and answers one batch of 8 images per task.

    python benchmarks/multitask_memory.py --backbone vistune/vit-tiny-cifar10 --method lora
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import peak_mb  # noqa: E402
from _tasks import make_tasks  # noqa: E402


def child(args) -> dict:
    from vistune.artifacts import load_artifact
    from vistune.backbones import load_backbone
    from vistune.multitask import MultiTask

    torch.set_num_threads(1)
    dirs = sorted(Path(args.root).glob(f"{args.method}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))[:args.n]
    x = torch.randn(8, 3, args.image_size, args.image_size)
    with torch.no_grad():
        if args.mode == "shared":
            mt = MultiTask(load_backbone(args.backbone), dirs)
            for d in dirs:
                mt(x, [d.name] * len(x))
        else:
            models = [load_artifact(d)[0] for d in dirs]  # each with a backbone of its own
            for m in models:
                m(x)
    return {"mode": args.mode, "n": args.n, "peak_mb": peak_mb(torch.device("cpu"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vistune/vit-tiny-cifar10")
    p.add_argument("--method", default="lora")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--tasks", default="1,4,16,64")
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    from vistune.backbones import load_backbone

    counts = [int(n) for n in args.tasks.split(",")]
    root = Path(tempfile.mkdtemp(prefix="vistune-mt-mem-"))
    make_tasks(load_backbone(args.backbone), args.method, max(counts), root, args.image_size)
    print(f"backbone {args.backbone}, method {args.method}, {args.image_size}px, CPU, 1 thread, "
          f"torch {torch.__version__}; peak RSS (VmHWM) of a fresh process that answered a batch of 8 per task")
    print("| tasks | one backbone (MultiTask) | × one model | N separate models | × one model |")
    print("|---:|---:|---:|---:|---:|", flush=True)
    one = None
    for n in counts:
        peak = {}
        for mode in ("separate", "shared"):
            out = subprocess.run([sys.executable, __file__, "--backbone", args.backbone, "--method", args.method,
                                  "--image-size", str(args.image_size), "--root", str(root), "--mode", mode,
                                  "--n", str(n)], capture_output=True, text=True, check=True)
            peak[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        one = one or (peak["separate"] if n == 1 else None)
        ratio = (lambda v: f"{v / one:.2f}") if one else (lambda v: "–")
        print(f"| {n} | {peak['shared']:.0f} MiB | {ratio(peak['shared'])} | {peak['separate']:.0f} MiB | "
              f"{ratio(peak['separate'])} |", flush=True)

if __name__ == "__main__":
    main()
