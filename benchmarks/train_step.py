"""Train-step time, peak memory and inference latency of vistune methods on one backbone.

Every configuration runs in its own subprocess so that peak memory is its own: CUDA max allocated
on a GPU, the process's peak RSS on a CPU (that includes the Python + torch baseline; the `floor`
rows show it). Rows:
  frozen-floor  forward + input-gradient backward of the bare backbone (what any method that needs
                gradients at the input pays at least; no parameter gradients)
  infer-bare    inference of the bare backbone (pooled features)
  <method>      one optimizer step (forward, backward, SGD step) of the adapted model and its
                inference latency at batch N and at batch 1
  pgn@deploy    (any method with an input-only mode) inference measured in deploy mode: the
                prompts enter the frozen backbone as extra pixel patches

Example (the table in docs/benchmarks.md):
  python benchmarks/train_step.py --backbone tf_efficientnet_lite0 --image-size 128 --batch-size 32 \
      --methods linear,full,partial-1,mlp-3,bias,adapter,sidetune,vpt-pad
  python benchmarks/train_step.py --backbone vit_base_patch32_224 --random-init --image-size 224 \
      --batch-size 32 --methods pgn,pgn@deploy,vpt-deep:num_tokens=16,full
  --task segmentation: the methods get the FPN decoder head (per-pixel loss on (B, H, W) targets); the bare
  rows run the backbone's multi-scale forward (forward_intermediates) instead of the pooled one
  (docs/segmentation.md):
  python benchmarks/train_step.py --backbone tf_efficientnet_lite0 --image-size 128 --batch-size 32 \
      --task segmentation --methods linear,pro-tuning,full
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from _harness import autocast, method_config, peak_mb, run_configs, sgd_step, split_methods, timeit


def measure(args) -> dict:
    """Runs in the child process: one configuration."""
    from vistune.backbones import load_backbone
    from vistune.methods import adapt, count_parameters, make_config

    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    backbone = load_backbone(args.backbone, random_init=args.random_init, model_kwargs=kwargs)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    if args.task == "segmentation":
        from vistune.methods.decoder import dense_features

        y = torch.randint(0, 10, (args.batch_size, args.image_size, args.image_size), device=device)
        backbone.forward_features = lambda xb: sum(f.float().mean() for f in dense_features(backbone, xb))
    amp = autocast(device)
    row = {"config": args.config}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.config in ("frozen-floor", "infer-bare"):
        backbone.to(device)
        if args.config == "frozen-floor":
            def step():
                xi = x.detach().requires_grad_(True)
                with amp:
                    out = backbone.forward_features(xi)
                out.float().sum().backward()
            row["train_step_ms"] = 1000 * timeit(step, device, args.steps, args.warmup)
        else:
            with torch.no_grad(), amp:
                row["infer_ms"] = 1000 * timeit(lambda: backbone.forward_features(x), device, args.steps,
                                                 args.warmup)
                row["infer1_ms"] = 1000 * timeit(lambda: backbone.forward_features(x[:1]), device, args.steps,
                                                  args.warmup)
        row["tuned_params"] = 0
    else:
        method, sets = method_config(args.config)
        name, _, mode = method.partition("@")
        config = make_config(name, sets)
        if getattr(config, "image_size", "absent") is None:
            config.image_size = args.image_size
        model = adapt(backbone, config, 10, task=args.task).to(device)
        row["train_step_ms"] = 1000 * timeit(sgd_step(model, x, y, device), device, args.steps, args.warmup)
        peak_train = peak_mb(device) if device.type == "cuda" else None
        model.eval()
        if mode == "deploy":
            model.deploy = True
        with torch.no_grad(), amp:
            row["infer_ms"] = 1000 * timeit(lambda: model(x), device, args.steps, args.warmup)
            row["infer1_ms"] = 1000 * timeit(lambda: model(x[:1]), device, args.steps, args.warmup)
        row["tuned_params"] = count_parameters(model)["tuned_params"]
        if peak_train is not None:
            row["peak_mb"] = peak_train
    if "peak_mb" not in row:
        row["peak_mb"] = peak_mb(device)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--model-kwargs", default="", help="JSON dict of timm kwargs (with --random-init)")
    p.add_argument("--methods", default="linear,full,partial-1,mlp-3,bias,adapter,sidetune,vpt-pad",
                   help="comma list; options after a colon, e.g. vpt-deep:num_tokens=50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification")
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
    _print_table(run_configs(__file__, ["frozen-floor", "infer-bare"] + split_methods(args.methods)), args)


def _print_table(rows, args):
    bare = next((r for r in rows if r["config"] == "infer-bare"), None)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {platform.machine()}, " \
        f"{torch.get_num_threads()} threads"
    print(f"\n{args.task}, backbone {args.backbone}, batch {args.batch_size}, {args.image_size}px, {dev}, torch {torch.__version__}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"| config | tuned params | train step (ms) | peak memory (MiB) | inference b{args.batch_size} (ms) | "
          f"/ bare | inference b1 (ms) | / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in rows:
        ratios = [f"{r[k] / bare[k]:.2f}×" if k in r and bare else "-" for k in ("infer_ms", "infer1_ms")]
        print(f"| {r['config']} | {r['tuned_params']:,} | {r.get('train_step_ms', nan):.1f} | {r['peak_mb']:.0f} | "
              f"{r.get('infer_ms', nan):.1f} | {ratios[0]} | {r.get('infer1_ms', nan):.1f} | {ratios[1]} |")


if __name__ == "__main__":
    main()
