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

import torch

import _harness
from _harness import NUM_CLASSES, autocast, child_inputs, method_config, peak_mb, sgd_step, split_methods, timeit


def measure(args) -> dict:
    """Runs in the child process: one configuration."""
    from vistune.methods import adapt, count_parameters, make_config

    device, backbone, x, y = child_inputs(args)
    if args.task == "segmentation":
        from vistune.methods.decoder import dense_features

        y = torch.randint(0, NUM_CLASSES, (args.batch_size, args.image_size, args.image_size), device=device)
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
        model = adapt(backbone, make_config(name, sets, image_size=args.image_size), NUM_CLASSES,
                      task=args.task).to(device)
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
    p = _harness.parser(__doc__, "linear,full,partial-1,mlp-3,bias,adapter,sidetune,vpt-pad",
                        "comma list; options after a colon, e.g. vpt-deep:num_tokens=50")
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification")
    args = p.parse_args()
    _harness.main(args, __file__, ["frozen-floor", "infer-bare"] + split_methods(args.methods), measure,
                  _print_table)


def _print_table(rows, args):
    bare = next((r for r in rows if r["config"] == "infer-bare"), None)
    print(f"\n{args.task}, {_harness.machine(args)}")
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
