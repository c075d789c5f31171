"""The efficiency protocol of `vistune bench` (vistune.bench.efficiency), on tiny random backbones."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import IMAGE_SIZE, TINY

from vistune.backbones import load_backbone
from vistune.bench import efficiency
from vistune.bench.efficiency import backbone_spec_of, measure_efficiency, measure_in_subprocess
from vistune.errors import VistuneError
from vistune.methods import adapt, make_config

# batch 64: enough images that a batch takes clearly longer than one image even on a busy machine
SIZES = dict(image_size=IMAGE_SIZE, batch_size=64, steps=3, warmup=1, device="cpu")
KEYS = {"train_step_ms", "train_images_per_s", "peak_memory_mb", "peak_memory_kind", "latency_b1_ms",
        "latency_bn_ms", "tuned_params", "device", "batch_size", "image_size", "steps", "warmup", "torch_threads"}
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def vit(tiny_backbones):
    return tiny_backbones("vit")


@pytest.mark.parametrize("method, options", [("linear", {}), ("adapter", {"reduction": 4}), ("lora", {"r": 2})])
def test_measures_training_and_inference_and_leaves_the_backbone_untouched(vit, one_thread, method, options):
    before = {k: v.clone() for k, v in vit.model.state_dict().items()}
    result = measure_efficiency(vit, method, options, NUM_CLASSES, **SIZES)

    assert set(result) == KEYS
    adapted = adapt(vit, make_config(method, options), NUM_CLASSES)
    assert result["tuned_params"] == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    head = 32 * NUM_CLASSES + NUM_CLASSES  # embed_dim 32
    assert (result["tuned_params"] == head) == (method == "linear")
    assert result["train_step_ms"] > 0
    assert result["train_images_per_s"] == pytest.approx(64 / (result["train_step_ms"] / 1000))
    assert 0 < result["latency_b1_ms"] < result["latency_bn_ms"]
    assert result["peak_memory_mb"] > 100 and result["peak_memory_kind"] == "process-peak-rss"
    assert (result["device"], result["torch_threads"]) == ("cpu", 1)
    assert {k: result[k] for k in ("batch_size", "image_size", "steps", "warmup")} == \
        {"batch_size": 64, "image_size": IMAGE_SIZE, "steps": 3, "warmup": 1}

    after = vit.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_methods_that_need_data_are_prepared_on_the_synthetic_batch(vit):
    x, y = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randint(0, NUM_CLASSES, (8,))
    model = efficiency._build(vit, "sct", {}, NUM_CLASSES, IMAGE_SIZE, x, y, torch.device("cpu"))
    assert model.calibrated  # SCT's channel selection ran, as run_job's model.prepare does before training


def test_rejects_sizes_that_cannot_train():
    with pytest.raises(VistuneError, match="batch_size=1"):
        measure_efficiency(None, "linear", {}, NUM_CLASSES, image_size=IMAGE_SIZE, batch_size=1)


@pytest.mark.parametrize("kind", ["vit", "swin", "efficientnet"])
def test_backbone_spec_rebuilds_the_same_backbone_through_json(tiny_backbones, kind):
    backbone = tiny_backbones(kind)
    spec = json.loads(json.dumps(backbone_spec_of(backbone)))  # as the child process receives it
    assert spec == {"name": TINY[kind][0], "checkpoint": None, "random_init": True,
                    "model_kwargs": json.loads(json.dumps(TINY[kind][1]))}
    assert load_backbone(**spec).fingerprint() == backbone.fingerprint()


def test_backbone_spec_refuses_options_a_child_cannot_receive():
    arch, kwargs = TINY["vit"]
    backbone = load_backbone(arch, random_init=True, model_kwargs={**kwargs, "act_layer": torch.nn.ReLU})
    with pytest.raises(VistuneError, match="cannot be passed to a child process"):
        backbone_spec_of(backbone)


def test_subprocess_measures_the_same_model_in_a_process_of_its_own(vit, one_thread):
    # a parent that once held 1 GiB more than any child needs: a child's peak must not inherit it
    # (Linux's ru_maxrss does carry a parent's peak over into its children)
    ballast = bytearray(2**30)
    ballast[::4096] = b"\1" * len(ballast[::4096])
    del ballast
    parent_peak = efficiency.peak_memory_mb(torch.device("cpu"))

    child = measure_in_subprocess(backbone_spec_of(vit), "lora", {"r": 2}, NUM_CLASSES, **SIZES)
    here = measure_efficiency(vit, "lora", {"r": 2}, NUM_CLASSES, **SIZES)
    assert set(child) == set(here) == KEYS
    assert child["tuned_params"] == here["tuned_params"]
    assert child["peak_memory_mb"] < parent_peak - 512


def test_a_failing_child_raises_with_its_message(vit):
    # valid options (the parent checks them), but the tiny ViT has 2 blocks: only building the model fails
    with pytest.raises(VistuneError, match="partial: k=5 but backbone 'vit_tiny_patch16_224' has only 2 blocks"):
        measure_in_subprocess(backbone_spec_of(vit), "partial", {"k": 5}, NUM_CLASSES, **SIZES)


def test_a_bad_option_fails_before_any_child_starts(vit, monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError("a child process was started")

    monkeypatch.setattr(subprocess, "run", no_child)
    with pytest.raises(VistuneError, match="lora.r='two' is not a valid int"):
        measure_in_subprocess(backbone_spec_of(vit), "lora", {"r": "two"}, NUM_CLASSES, **SIZES)
