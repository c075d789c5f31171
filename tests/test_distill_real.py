"""Distillation on real weights and real images: a stronger ImageNet teacher makes a better student (mnist5k)."""
from __future__ import annotations

import numpy as np
import pytest

SIZE = 64


@pytest.mark.slow
def test_distilled_student_beats_labels_only_on_mnist5k(tmp_path, one_thread):
    """The docs/methods.md table's mnist5k rows, retrained from scratch: teacher ImageNet EfficientNet-Lite2 +
    partial-2 (800 train / 200 val, 64 px, 10 epochs, the method's lr); student ImageNet MobileNetV2 + linear, the
    same data and budget (20 epochs, batch 32), labels only vs distilled (T=4, α=0.5), seeds 42/44/82, each
    condition at the lr it selected on val in that table (labels 2, distilled 0.5). The table measured test 0.874
    (labels) vs 0.883 (distilled). Not every task gains: on fashion-mnist and digits the distilled linear student
    loses (docs/methods.md), so this is the task the test can hold the claim to. Run 2026-12-01: it reproduced the
    table's per-seed numbers exactly (teacher 0.946; labels 0.874, distilled 0.883) in 19 min 53 s on the shared
    2-core machine at load average ~10."""
    from vistune.backbones import load_backbone
    from vistune.distill import DistillJob, run_distill
    from vistune.run import Job, prepare_job, run_job
    from vistune.training import TrainConfig

    def job(backbone, method, out=None, epochs=20, lr=2.0, seed=42):
        return Job(backbone=backbone, method=method, data="mnist5k", image_size=SIZE, train_size=800, val_size=200,
                   out=out, train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, seed=seed, device="cpu",
                                              optimizer="sgd"))  # the docs table's recipe (SGD; lr=None: 1.0)

    teacher = tmp_path / "teacher"
    t = run_job(job("tf_efficientnet_lite2", "partial-2", out=str(teacher), epochs=10, lr=None), progress=False)
    student = load_backbone("mobilenetv2_100")
    data = prepare_job(job("mobilenetv2_100", "linear"), backbone=student).data
    labels, distilled = [], []
    for seed in (42, 44, 82):
        labels.append(run_job(job("mobilenetv2_100", "linear", seed=seed), backbone=student, data=data,
                              progress=False)["test_accuracy"])
        distilled.append(run_distill(DistillJob(job("mobilenetv2_100", "linear", lr=0.5, seed=seed), str(teacher)),
                                     backbone=student, data=data, progress=False)["test_accuracy"])
    print(f"teacher test {t['test_accuracy']:.3f}; labels {np.mean(labels):.3f} {labels}; "
          f"distilled {np.mean(distilled):.3f} {distilled}")
    assert t["test_accuracy"] > np.mean(labels)  # the teacher is the stronger model
    assert np.mean(distilled) > np.mean(labels)
