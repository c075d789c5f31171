"""Every family of methods learns with its default settings (no --lr, --optimizer or --warmup-epochs): on real
digits with the real ImageNet EfficientNet-Lite0 at 48 px (vistune's own CIFAR-10 ViT at 32 px for the token
tuners), two short epochs must not diverge, must lower the training loss and lift val accuracy well above
chance (0.1).

This is what the old defaults (SGD at base lr 1.0 for every method) failed: at 48 px the linear probe's loss
exploded in the first epoch and bias tuning collapsed to chance (loss ln 10) in the second; both now stop with
TrainingDiverged, which fails these tests. The lrs themselves are measured in docs/defaults.md."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import IMAGE_SIZE

from vistune.backbones import OFFLINE_BACKBONES, load_backbone
from vistune.data import load_data
from vistune.methods import METHODS, adapt, make_config
from vistune.run import Job, preprocessing_for, run_job, transforms_for
from vistune.training import TrainConfig

pytest.importorskip("sklearn", reason="digits comes from scikit-learn")

CNN, VIT = "tf_efficientnet_lite0", "vistune/vit-tiny-cifar10"
SIZES = {CNN: 48, VIT: 32}
# every category (fine-tuning, parameter, adapter, prompt) and every kind: head, module tuner on the backbone's
# own parameters, module tuner that wraps modules, peft-based module tuner, input tuner, side tuner, token tuner
# (vpt-deep: the SGD recipe of the VPT family)
FAMILIES = [("linear", CNN), ("bias", CNN), ("adapter", CNN), ("lora", CNN), ("vpt-pad", CNN), ("sidetune", CNN),
            ("vpt-deep", VIT)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


_cache: dict = {}


def setup(name: str):
    """(backbone, digits splits: 160 train / 100 val, decoded once) for one backbone."""
    if name not in _cache:
        if name == CNN and not OFFLINE_BACKBONES[CNN].available():
            pytest.skip(OFFLINE_BACKBONES[CNN].install)
        backbone = load_backbone(name)
        train_tf, eval_tf = transforms_for(preprocessing_for(backbone, Job(backbone=name, method="linear",
                                                                           data="digits", image_size=SIZES[name])))
        data = load_data("digits", train_transform=train_tf, eval_transform=eval_tf, train_size=160, val_size=100,
                         data_seed=0)
        _cache[name] = backbone, dataclasses.replace(data, test=None)
    return _cache[name]


@pytest.mark.parametrize("method,backbone_name", FAMILIES, ids=[m for m, _ in FAMILIES])
def test_the_default_settings_learn(method, backbone_name):
    backbone, data = setup(backbone_name)
    job = Job(backbone=backbone_name, method=method, data="digits", image_size=SIZES[backbone_name],
              train=TrainConfig(epochs=2, batch_size=32, device="cpu", seed=0))
    m = run_job(job, backbone=backbone, data=data, progress=False)  # a diverged default raises TrainingDiverged
    history = m["history"]
    cls = METHODS[method].method_class  # the run used the method's own defaults
    assert m["train_config"]["optimizer"] == cls.default_optimizer
    assert m["train_config"]["base_lr"] == TrainConfig().default_lr(cls, backbone.family)
    # 10 steps in all: a slow starter (vpt-deep went 2.30 → 2.18) still falls; a diverged or collapsed run rises
    # or sits at ln 10 ≈ 2.30
    assert history[-1]["train_loss"] < history[0]["start_loss"] - 0.05, history
    assert m["val_accuracy"] >= 0.3, history  # chance: 0.1; 100 val images: 0.3 is far outside chance's noise


def test_the_families_cover_every_category_and_kind():
    """A new category or tuner kind must get its default-settings test here."""
    tested = [METHODS[m] for m, _ in FAMILIES]
    assert {i.category for i in tested} == {i.category for i in METHODS.values()}
    assert {k for i in tested for k in i.kinds} == {k for i in METHODS.values() for k in i.kinds}


@pytest.mark.parametrize("method", sorted(m for m, i in METHODS.items() if i.method_class.default_lrs_by_family))
def test_a_family_default_lr_replaces_the_methods_own_on_that_family_only(method, tiny_backbones):
    """bias, ssf, lora, dora (LoRA's), ln-tuning, full, sidetune and vpt-pad train CNNs (the generic view) at their
    own lr, linear, bias, ia3, adapter-plus and pro-tuning the ViTs, measured (docs/defaults.md): e.g. the ViT's
    AdamW 0.05 reached 0.54 (ssf) of the best on MobileNetV2."""

    cls = METHODS[method].method_class
    optimizer = cls.default_optimizer
    for kind in ("efficientnet", "vit"):
        backbone = tiny_backbones(kind)
        if not METHODS[method].supports(backbone):
            continue
        model = adapt(backbone, make_config(method, image_size=IMAGE_SIZE), num_classes=3)
        expected = cls.default_lrs_by_family.get(backbone.family, cls.default_lrs)[optimizer]
        assert TrainConfig().default_lr(model) == expected  # the adapted model's own family is used
        assert TrainConfig().default_lr(cls, backbone.family) == expected
        assert TrainConfig(lr=0.003).base_lr(model) == 0.003  # --lr still wins
    for family, lrs in cls.default_lrs_by_family.items():  # an override equal to the method's own is a slip
        assert lrs[optimizer] != cls.default_lrs[optimizer], family
