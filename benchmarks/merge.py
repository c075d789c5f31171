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
import platform

import torch

from _harness import autocast, method_config, peak_mb, run_configs, sgd_step, timeit, timeit_interleaved


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
    amp = autocast(device)
    bare = copy.deepcopy(backbone.model)
    bare.reset_classifier(10)
    bare = bare.to(device).eval()
    row = {"config": args.config}
    if args.config == "bare":
        with torch.no_grad(), amp:
            row["infer_bare_ms"] = 1000 * timeit(lambda: bare(x), device, args.steps, args.warmup)
        row.update(tuned_params=0, peak_mb=peak_mb(device))
        return row
    name, sets = method_config(args.config)
    model = adapt(backbone, make_config(name, sets), 10).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["train_step_ms"] = 1000 * timeit(sgd_step(model, x, y, device), device, args.steps, args.warmup)
    row["peak_mb"] = peak_mb(device)
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
        for key, seconds in timeit_interleaved(fns, device, args.steps, args.warmup).items():
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
    _print_table(run_configs(__file__, ["bare"] + args.methods.split(",")), args)


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
