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

import copy

import torch

import _harness
from _harness import NUM_CLASSES, autocast, child_inputs, method_config, peak_mb, sgd_step, timeit, timeit_interleaved


def measure(args) -> dict:
    """Runs in the child process: one configuration."""
    from vistune.merge import merge
    from vistune.methods import adapt, count_parameters, make_config

    device, backbone, x, y = child_inputs(args)
    amp = autocast(device)
    bare = copy.deepcopy(backbone.model)
    bare.reset_classifier(NUM_CLASSES)
    bare = bare.to(device).eval()
    row = {"config": args.config}
    if args.config == "bare":
        with torch.no_grad(), amp:
            row["infer_bare_ms"] = 1000 * timeit(lambda: bare(x), device, args.steps, args.warmup)
        row.update(tuned_params=0, peak_mb=peak_mb(device))
        return row
    name, sets = method_config(args.config)
    model = adapt(backbone, make_config(name, sets), NUM_CLASSES).to(device)
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
    args = _harness.parser(__doc__, "full,linear,lora,dora,ia3,ln-tuning,ssf",
                           "comma list; options after a colon, e.g. lora:r=16 (one option per method)").parse_args()
    _harness.main(args, __file__, ["bare"] + args.methods.split(","), measure, _print_table)


def _print_table(rows, args):
    print(f"\n{_harness.machine(args)}")
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
