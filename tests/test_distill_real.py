"""Distillation on real weights and real images: a stronger ImageNet teacher makes a better student."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

SIZE = 48


@pytest.mark.slow
def test_distilled_student_beats_labels_only_on_digits(tmp_path, one_thread):
    """Teacher: ImageNet EfficientNet-Lite2 + partial-2 on sklearn digits (800 train / 200 val, 48 px, 8 epochs).
    Student: ImageNet MobileNetV2 + linear, the same data and budget (20 epochs), labels only vs distilled (T=4,
    α=0.5) with the 438 digits outside the 800/200/test as unlabelled images, seeds 42/44/82. The lrs are those
    each condition selected on val on mnist5k (docs/methods.md: labels 2, distilled 0.5; the KD term's logit
    gradient is (1−α)·T times the CE's). Not yet run to completion or timed: the session that wrote it had the
    shared machine at load average ~25."""
    from vistune.backbones import load_backbone
    from vistune.distill import DistillJob, run_distill
    from vistune.run import Job, prepare_job, run_job
    from vistune.training import TrainConfig

    def job(backbone, method, out=None, epochs=20, lr=2.0, seed=42):
        return Job(backbone=backbone, method=method, data="digits", image_size=SIZE, train_size=800, val_size=200,
                   out=out, train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, seed=seed, device="cpu"))

    teacher = tmp_path / "teacher"
    t = run_job(job("tf_efficientnet_lite2", "partial-2", out=str(teacher), epochs=8, lr=None), progress=False)
    student = load_backbone("mobilenetv2_100")
    data = prepare_job(job("mobilenetv2_100", "linear"), backbone=student).data
    unused = np.setdiff1d(np.arange(len(data.train.images)),
                          np.concatenate([data.train.indices, data.val.indices, data.test.indices]))
    (tmp_path / "unlabelled").mkdir()
    for i in unused:
        Image.fromarray(data.train.images[i], "L").save(tmp_path / "unlabelled" / f"{i}.png")
    labels, distilled = [], []
    for seed in (42, 44, 82):
        labels.append(run_job(job("mobilenetv2_100", "linear", seed=seed), backbone=student, data=data,
                              progress=False)["test_accuracy"])
        distilled.append(run_distill(DistillJob(job("mobilenetv2_100", "linear", lr=0.5, seed=seed), str(teacher),
                                                unlabelled=str(tmp_path / "unlabelled")),
                                     backbone=student, data=data, progress=False)["test_accuracy"])
    print(f"teacher test {t['test_accuracy']:.3f}; labels {np.mean(labels):.3f} {labels}; "
          f"distilled {np.mean(distilled):.3f} {distilled}; unlabelled {len(unused)}")
    assert np.mean(distilled) > np.mean(labels)
