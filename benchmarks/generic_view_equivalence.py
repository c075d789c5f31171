"""Is a method attached through one source tree the same function as through another? (e.g. the generic view of
this tree vs the CNN view of an older checkout).

For each backbone × method the same job (same seed, same data, same recipe) is trained in one child process per
source tree (``PYTHONPATH=<tree>/src``; the child trains every configuration in turn); the table prints each tree's tuned-parameter count, test accuracy and
the sha256 of the trained tensors (the artifact's: every tensor that is not a frozen backbone tensor). Equal
hashes mean the two trees trained bit-identical models.

    python benchmarks/generic_view_equivalence.py --ref /path/to/old/checkout \\
        --backbones tf_efficientnet_lite0,mobilenetv2_100,vistune/vit-tiny-cifar10 \\
        --methods adapter,sct,pro-tuning,lora,partial-1,ssf,ln-tuning,ia3,bias
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import torch


def measure(backbone: str, method: str, args) -> dict:
    from vistune import Job, run_job
    from vistune.methods import count_parameters
    from vistune.training import TrainConfig

    torch.set_num_threads(args.threads)
    size = 32 if backbone.startswith("vistune/") else args.image_size
    job = Job(backbone=backbone, method=method, data="digits", image_size=size, train_size=args.train_size,
              val_size=args.val_size, train=TrainConfig(epochs=args.epochs, batch_size=32, seed=0, device="cpu",
                                                        optimizer=args.optimizer, lr=args.lr,
                                                        warmup_epochs=args.warmup_epochs))
    metrics = run_job(job, progress=False)
    model = metrics["model"]
    digest = hashlib.sha256()
    for key, tensor in sorted(model.tuned_state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"tuned_params": count_parameters(model)["tuned_params_excluding_head"],
            "test_accuracy": metrics["test_accuracy"], "sha256": digest.hexdigest()[:16]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the other source tree (a checkout: its src/ is imported)")
    p.add_argument("--backbones", default="tf_efficientnet_lite0,mobilenetv2_100,vistune/vit-tiny-cifar10")
    p.add_argument("--methods", default="adapter,sct,pro-tuning,lora,partial-1,ssf,ln-tuning,ia3,bias")
    p.add_argument("--image-size", type=int, default=64, help="CNN input size (vistune's own ViT: 32)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-size", type=int, default=320)
    p.add_argument("--val-size", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    # the recipe is pinned: the two trees may have other method defaults (e.g. before/after docs/defaults.md)
    p.add_argument("--optimizer", default="adamw", help="the optimizer of every run in both trees")
    p.add_argument("--lr", type=float, default=0.01, help="the base lr of every run in both trees")
    p.add_argument("--warmup-epochs", type=int, default=0, help="warm-up epochs of every run in both trees")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    configs = [(b, m) for b in args.backbones.split(",") for m in args.methods.split(",")]
    if args.child:
        for backbone, method in configs:
            print("RESULT " + json.dumps([backbone, method, measure(backbone, method, args)]), flush=True)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, "ref": os.path.abspath(args.ref)}
    print("| backbone | method | params (this) | params (ref) | test acc (this) | test acc (ref) | same tensors |")
    print("|---|---|---:|---:|---:|---:|---|")
    results = {}
    for label, tree in trees.items():
        env = {**os.environ, "PYTHONPATH": os.path.join(tree, "src"), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        results[label] = {(b, m): r for b, m, r in (json.loads(x[7:]) for x in out.stdout.splitlines()
                                                    if x.startswith("RESULT "))}
        if len(results[label]) < len(configs):
            print(f"{label}: {out.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
    for backbone, method in configs:
        a, b = results["this tree"].get((backbone, method)), results["ref"].get((backbone, method))
        if a is None or b is None:
            print(f"| {backbone} | {method} | {'failed' if a is None else ''} | {'failed' if b is None else ''} | | | |")
            continue
        print(f"| {backbone} | {method} | {a['tuned_params']:,} | {b['tuned_params']:,} | {a['test_accuracy']:.4f} "
              f"| {b['test_accuracy']:.4f} | {'yes' if a['sha256'] == b['sha256'] else 'NO'} |")


if __name__ == "__main__":
    main()
