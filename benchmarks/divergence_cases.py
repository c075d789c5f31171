"""Real runs that test the divergence stop (docs/defaults.md, "The divergence stop"): each trains as
benchmarks/defaults.py does (own ViT × digits, 240 train / 200 val, 4 epochs, batch 32, seed 0, one torch thread)
and prints whether it finished or stopped with TrainingDiverged, and why.

- oft at SGD 1.0 (its earlier default): the loss rose 2.5 → 3.6 and the run finished at val 0.115 before the
  lasting-rise rule; it must stop.
- vpt-shallow at SGD 1.0 (its default): one bad epoch (2.4, 3.2, 2.3, 1.5), val 0.49; it must finish.

  python benchmarks/divergence_cases.py      # ~3 min on one idle core
"""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defaults import load_task  # noqa: E402  (the same data as the defaults benchmark)

CASES = [("oft", "sgd", 1.0, "stops"), ("vpt-shallow", "sgd", 1.0, "finishes")]


def main() -> int:
    from vistune.backbones import load_backbone
    from vistune.errors import TrainingDiverged
    from vistune.run import Job, run_job
    from vistune.training import TrainConfig

    torch.set_num_threads(1)
    backbone = load_backbone("vistune/vit-tiny-cifar10")
    data = load_task(backbone, "digits", types.SimpleNamespace(train_size=240, val_size=200))
    print("| method | optimizer, base lr | expected | outcome | epoch losses / reason | seconds |")
    print("|---|---|---|---|---|---|")
    wrong = 0
    for method, optimizer, lr, expected in CASES:
        job = Job(backbone=backbone.spec.name, method=method, data="digits", image_size=32,
                  train=TrainConfig(epochs=4, batch_size=32, lr=lr, optimizer=optimizer, device="cpu", seed=0))
        t0 = time.perf_counter()
        try:
            m = run_job(job, backbone=backbone, data=data, progress=False)
            outcome = "finishes"
            detail = ", ".join(f"{h['train_loss']:.2f}" for h in m["history"]) + f"; val {m['val_accuracy']:.3f}"
        except TrainingDiverged as e:
            outcome, detail = "stops", e.what
        wrong += outcome != expected
        print(f"| {method} | {optimizer} {lr:g} | {expected} | {outcome} | {detail} | {time.perf_counter() - t0:.0f} |",
              flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
