"""Wall time of a linear probe with and without the feature cache (TrainConfig.cache_features).

Cached: the frozen backbone runs once over train + val, then every epoch trains the head on the stored
features. Uncached: the backbone runs on every training and validation batch of every epoch. Both keep
the decoded, transformed images in memory (cache_inputs), so the difference is the backbone alone.

When ``--uncached-epochs`` is below ``--epochs`` (100 uncached epochs of a real backbone take long on a
CPU), the uncached run trains that many epochs and its 100-epoch time is EXTRAPOLATED: its first epoch
(which also decodes the images) + (epochs - 1) × the mean of its later epochs. The output says so.
Both runs also train the first ``--uncached-epochs`` epochs with the same settings, and the script checks
that they reach the same val accuracy in each (the cache changes the cost, not the result).

Times exclude loading the backbone and the data set (both paths pay them). Example (docs/benchmarks.md):
  python benchmarks/feature_cache.py --backbone tf_efficientnet_lite0 --data digits --epochs 100 \
      --uncached-epochs 3 --device cpu
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch


def timed_train(backbone, data, cfg, *, cache: bool):
    from vistune.methods import adapt, make_config
    from vistune.training import train
    from vistune.training.trainer import resolve_device

    print(f"timing {cfg.epochs} epochs {'with' if cache else 'without'} the feature cache …", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = adapt(backbone, make_config("linear"), num_classes=len(data.class_names))
    cfg.cache_features = cache
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = train(model, data.train, data.val, cfg, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--data", default="digits", help="a vistune data spec (built-in name or folder)")
    ap.add_argument("--train-size", type=int, default=800)
    ap.add_argument("--val-size", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--uncached-epochs", type=int, default=None, help="default: --epochs (no extrapolation)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="base lr (default: the linear probe's own default)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    uncached_epochs = args.uncached_epochs or args.epochs
    if not 2 <= uncached_epochs <= args.epochs:
        ap.error("--uncached-epochs must be between 2 and --epochs")

    from vistune.backbones import load_backbone
    from vistune.data import load_data
    from vistune.run import Job, preprocessing_for, transforms_for
    from vistune.training import TrainConfig
    from vistune.training.trainer import resolve_device

    backbone = load_backbone(args.backbone)
    job = Job(backbone=args.backbone, method="linear", data=args.data, image_size=args.image_size)
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, job))
    data = load_data(args.data, train_transform=train_tf, eval_transform=eval_tf, train_size=args.train_size,
                     val_size=args.val_size, seed=0)

    def config(epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=0)

    short_cached, short_cached_s = timed_train(backbone, data, config(uncached_epochs), cache=True)
    uncached, uncached_s = timed_train(backbone, data, config(uncached_epochs), cache=False)
    same = [h["val_accuracy"] for h in short_cached.history] == [h["val_accuracy"] for h in uncached.history]
    cached, cached_s = (short_cached, short_cached_s) if uncached_epochs == args.epochs else \
        timed_train(backbone, data, config(args.epochs), cache=True)

    # validation time per epoch = the run's time outside the epochs' training loops, spread evenly
    val_each = (uncached_s - sum(h["seconds"] for h in uncached.history)) / uncached_epochs
    first = uncached.history[0]["seconds"] + val_each
    later = [h["seconds"] + val_each for h in uncached.history[1:]]
    extrapolated = uncached_epochs < args.epochs
    uncached_full = first + (args.epochs - 1) * statistics.mean(later) if extrapolated else uncached_s

    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"{args.backbone} linear probe on {args.data} ({data.summary()}) at {args.image_size} px, batch "
          f"{args.batch_size}, {device} ({where}), torch {torch.__version__}\n")
    print(f"| path | epochs timed | wall (s) | s / epoch | {args.epochs}-epoch wall (s) | val acc |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| uncached | {uncached_epochs} | {uncached_s:.1f} | {statistics.mean(later):.2f} (after the 1st) | "
          f"{uncached_full:.0f}{' (extrapolated)' if extrapolated else ''} | "
          f"{uncached.val_accuracy:.4f} (after {uncached_epochs}) |")
    print(f"| cached | {args.epochs} | {cached_s:.1f} | {cached_s / args.epochs:.3f} (incl. the feature pass) | "
          f"{cached_s:.0f} | {cached.val_accuracy:.4f} |")
    print(f"\nspeed-up of the cache over {args.epochs} epochs: {uncached_full / cached_s:.1f}×"
          + (f" (the uncached time is EXTRAPOLATED from {uncached_epochs} measured epochs)" if extrapolated else ""))
    print(f"same val accuracy in each of the first {uncached_epochs} epochs, cached vs uncached: "
          f"{'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
