"""The feature cache (head-only methods, no augmentation: the frozen backbone runs once per image) trains
exactly what the uncached path trains, epoch by epoch; and it is used only where that holds."""
from __future__ import annotations

import pytest
import torch

import vistune.training.trainer as trainer_mod
from conftest import IMAGE_SIZE, TINY, tinted_class_folder
from vistune.run import Job, run_job
from vistune.training import TrainConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes × 10 train / 4 test noisy images; a class tints one colour channel."""
    return tinted_class_folder(tmp_path_factory.mktemp("cache-data"), 10, 4, seed=2)


@pytest.fixture
def feature_caches(monkeypatch) -> list:
    """Records every FeatureCache the trainer builds (so a test knows which path ran)."""
    built = []

    class Recording(trainer_mod.FeatureCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(trainer_mod, "FeatureCache", Recording)
    return built


def run(kind, method, options, folder, backbones, *, cache: bool, augment: bool = False) -> dict:
    arch, kwargs = TINY[kind]
    job = Job(backbone=arch, method=method, data=str(folder), overrides=options, random_init=True,
              model_kwargs=kwargs, image_size=IMAGE_SIZE, augment=augment,
              train=TrainConfig(epochs=5, batch_size=4, lr=0.5, device="cpu", seed=5, cache_features=cache))
    return run_job(job, backbone=backbones(kind), progress=False)


# the CNN has frozen BatchNorm (eval mode: running statistics); MLP-2 has dropout and a train-mode BatchNorm
@pytest.mark.parametrize("kind,method,options", [("vit", "linear", {}), ("resnet", "linear", {}),
                                                 ("vit", "mlp", {"k": 2})], ids=["vit-linear", "cnn-linear", "vit-mlp2"])
def test_cached_features_train_what_the_uncached_path_trains(kind, method, options, folder, tiny_backbones,
                                                            feature_caches):
    uncached = run(kind, method, options, folder, tiny_backbones, cache=False)
    assert not feature_caches, "cache_features=False must run the backbone on every step"
    cached = run(kind, method, options, folder, tiny_backbones, cache=True)
    assert len(feature_caches) == 2, "the cached run computes train and val features once"
    assert [len(c) for c in feature_caches] == [24, 6]  # 30 train images, 20% split off for val
    for a, b in zip(cached["history"], uncached["history"]):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
    for key in ("val_accuracy", "best_epoch", "test_accuracy"):
        assert cached[key] == uncached[key], key
    sa, sb = cached["model"].tuned_state_dict(), uncached["model"].tuned_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)
    losses = [h["train_loss"] for h in uncached["history"]]
    assert losses[-1] < losses[0], "the runs learned something (the comparison is not of two idle heads)"


def test_no_cache_with_augmentation_or_for_methods_that_train_the_backbone(folder, tiny_backbones, feature_caches):
    run("vit", "linear", {}, folder, tiny_backbones, cache=True, augment=True)  # crops differ every epoch
    run("vit", "bias", {}, folder, tiny_backbones, cache=True)  # the feature changes as the biases train
    assert not feature_caches
