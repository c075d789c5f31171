"""Is a method attached through one source tree the same function as through another? (e.g. the generic view of
this tree vs the CNN view of an older checkout).

For each backbone × method the same job (same seed, same data, same recipe) is trained in a child process per
source tree (``PYTHONPATH=<tree>/src``); the table prints each tree's tuned-parameter count, test accuracy and
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
              val_size=args.val_size, train=TrainConfig(epochs=args.epochs, batch_size=32, seed=0, device="cpu"))
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
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(*args.child, args)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here, "ref": os.path.abspath(args.ref)}
    print(f"| backbone | method | params (this) | params (ref) | test acc (this) | test acc (ref) | same tensors |")
    print("|---|---|---:|---:|---:|---:|---|")
    for backbone in args.backbones.split(","):
        for method in args.methods.split(","):
            rows = {}
            for label, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": os.path.join(tree, "src"), "HF_HUB_OFFLINE": "1"}
                cmd = [sys.executable, os.path.abspath(__file__), "--ref", args.ref, "--child", backbone, method,
                       "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--train-size",
                       str(args.train_size), "--val-size", str(args.val_size), "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                rows[label] = json.loads(line[-1][7:]) if line else {"error": out.stderr.strip().splitlines()[-1:]}
            a, b = rows["this tree"], rows["ref"]
            if "error" in a or "error" in b:
                print(f"| {backbone} | {method} | {a.get('error', '')} | {b.get('error', '')} | | | |", flush=True)
                continue
            print(f"| {backbone} | {method} | {a['tuned_params']:,} | {b['tuned_params']:,} | {a['test_accuracy']:.4f} "
                  f"| {b['test_accuracy']:.4f} | {'yes' if a['sha256'] == b['sha256'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
