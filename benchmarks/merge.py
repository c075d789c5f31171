"""Weight-space methods: train-step time and peak memory vs full fine-tuning, and inference latency
of the adapted model (unmerged), the merged plain timm model and the bare stock model.

Every configuration runs in its own subprocess so that peak memory is its own: CUDA max allocated
on a GPU, the process's peak RSS on a CPU (measured right after the training steps; it includes the
Python + torch baseline, which the `bare` row shows). In each process the three inference timings
use the same batch and are measured in turns: unmerged = the adapted vistune model, merged = ``vistune.merge.merge(model)``,
bare = the stock timm model with a classifier of the same size.

Example (the tables in docs/peft.md):
  python benchmarks/merge.py --backbone tf_efficientnet_lite0 --image-size 128 --batch-size 32 --threads 1 \
      --steps 5 --warmup 2 --methods full,lora,dora,ia3,ln-tuning,ssf
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from _timing import sync, timeit  # benchmarks/_timing.py (the script's own folder)


def _timeit_interleaved(fns: dict, device, steps: int, warmup: int) -> dict[str, float]:
    """Median times of several functions measured in turns, so that load from other processes on a
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


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args) -> dict:
    """Runs in the child process: one configuration."""
    from vistune.backbones import load_backbone
    from vistune.merge import merge
    from vistune.methods import adapt, count_parameters, make_config

    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    backbone = load_backbone(args.backbone, random_init=args.random_init, model_kwargs=kwargs)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    bare = copy.deepcopy(backbone.model)
    bare.reset_classifier(10)
    bare = bare.to(device).eval()
    row = {"config": args.config}
    if args.config == "bare":
        with torch.no_grad(), amp:
            row["infer_bare_ms"] = 1000 * timeit(lambda: bare(x), device, args.steps, args.warmup)
        row.update(tuned_params=0, peak_mb=_peak_mb(device))
        return row
    name, _, opts = args.config.partition(":")
    sets = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    model = adapt(backbone, make_config(name, sets), 10).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        model.train()
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["train_step_ms"] = 1000 * timeit(step, device, args.steps, args.warmup)
    row["peak_mb"] = _peak_mb(device)
    row["tuned_params"] = count_parameters(model)["tuned_params"]
    model.eval()
    with torch.no_grad(), amp:
        fns = {"unmerged": lambda: model(x), "bare": lambda: bare(x)}
        try:
            merged = merge(model).to(device)
        except Exception as e:  # methods that cannot merge (VistuneError)
            row["merge"] = str(e).splitlines()[0]
        else:
            fns["merged"] = lambda: merged(x)
            row["max_abs_diff"] = float((merged(x).float() - model(x).float()).abs().max())
        for key, seconds in _timeit_interleaved(fns, device, args.steps, args.warmup).items():
            row[f"infer_{key}_ms"] = 1000 * seconds
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--model-kwargs", default="", help="JSON dict of timm kwargs (with --random-init)")
    p.add_argument("--methods", default="full,linear,lora,dora,ia3,ln-tuning,ssf",
                   help="comma list; options after a colon, e.g. lora:r=16 (one option per method)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--config", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        print(json.dumps(measure(args)))
        return
    rows = []
    for config in ["bare"] + args.methods.split(","):
        cmd = [sys.executable, __file__, "--config", config] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {config}", file=sys.stderr)
    _print_table(rows, args)


def _print_table(rows, args):
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU {platform.machine()}, {args.threads or torch.get_num_threads()} threads"
    print(f"\nbackbone {args.backbone}, batch {args.batch_size}, {args.image_size}px, {dev}, torch {torch.__version__}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print("| config | tuned params | train step (ms) | peak memory (MiB) | inference unmerged (ms) | "
          "merged (ms) | bare (ms) | merged − unmerged logits |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in rows:
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"| {r['config']} | {r['tuned_params']:,} | {r.get('train_step_ms', nan):.1f} | {r['peak_mb']:.0f} | "
              f"{r.get('infer_unmerged_ms', nan):.1f} | {r.get('infer_merged_ms', nan):.1f} | "
              f"{r['infer_bare_ms']:.1f} | {diff} |")


if __name__ == "__main__":
    main()
