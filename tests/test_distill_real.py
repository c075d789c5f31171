"""Distillation on real weights and real images: a stronger ImageNet teacher and unlabelled images make a better
student (mnist5k)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SIZE = 64
UNLABELLED = 1200


def write_unlabelled(data, folder):
    """The 1,200 unlabelled images the docs table used: benchmarks/distill_accuracy.py's own picker (same rule, same
    seed), loaded from its file (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_accuracy.py"
    spec = importlib.util.spec_from_file_location("distill_accuracy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.write_unlabelled(data, UNLABELLED, folder)


@pytest.mark.slow
def test_distilled_student_beats_labels_only_on_mnist5k(tmp_path, one_thread):
    """The docs/methods.md table's mnist5k rows, retrained from scratch: teacher ImageNet EfficientNet-Lite2 +
    partial-2 (800 train / 200 val, 64 px, 10 epochs, SGD base lr 1.0); student ImageNet MobileNetV2 + linear, the
    same labelled data and budget (20 epochs, batch 32, SGD), labels only vs distilled (T=4, α=0.5) with 1,200
    unlabelled mnist5k images, seeds 42/44/82, each condition at the lr it selected on val in that table (labels
    0.1, distilled + unlabelled 0.2). The table measured test 0.880 (labels) vs 0.898 (distilled + unlabelled).
    Distillation on the 800 labelled images alone ties with labels only on both tasks of the table, so it is the
    unlabelled images the test holds the claim to."""
    from vistune.backbones import load_backbone
    from vistune.distill import DistillJob, run_distill
    from vistune.run import Job, prepare_job, run_job
    from vistune.training import TrainConfig

    def job(backbone, method, out=None, epochs=20, lr=0.1, seed=42):
        return Job(backbone=backbone, method=method, data="mnist5k", image_size=SIZE, train_size=800, val_size=200,
                   test_size=1000, out=out, train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, seed=seed,
                                                              device="cpu", optimizer="sgd"))  # the table's recipe

    teacher = tmp_path / "teacher"
    t = run_job(job("tf_efficientnet_lite2", "partial-2", out=str(teacher), epochs=10, lr=1.0), progress=False)
    student = load_backbone("mobilenetv2_100")
    data = prepare_job(job("mobilenetv2_100", "linear"), backbone=student).data
    unlabelled = str(write_unlabelled(data, tmp_path / "unlabelled"))
    labels, distilled = [], []
    for seed in (42, 44, 82):
        labels.append(run_job(job("mobilenetv2_100", "linear", seed=seed), backbone=student, data=data,
                              progress=False)["test_accuracy"])
        distilled.append(run_distill(DistillJob(job("mobilenetv2_100", "linear", lr=0.2, seed=seed), str(teacher),
                                                unlabelled=unlabelled),
                                     backbone=student, data=data, progress=False)["test_accuracy"])
    print(f"teacher test {t['test_accuracy']:.3f}; labels {np.mean(labels):.3f} {labels}; "
          f"distilled + unlabelled {np.mean(distilled):.3f} {distilled}")
    assert t["test_accuracy"] > np.mean(labels)  # the teacher is the stronger model
    assert np.mean(distilled) > np.mean(labels) + 0.005
