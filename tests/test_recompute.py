"""--grad-checkpoint: recomputed block activations give the gradients of the stored-activation run, for every
kind of method and family; memory goes down; nothing is saved or changed (tiny random backbones: fast)."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from conftest import IMAGE_SIZE, tiny_backbone
from test_trainer import folder, job, without_timing  # noqa: F401 (folder: the tiny image-folder fixture)
from vistune.artifacts import TENSORS
from vistune.backbones import load_backbone
from vistune.cli.common import add_train_args, train_config
from vistune.methods import adapt, make_config
from vistune.run import run_job
from vistune.training.recompute import activation_checkpointing

X = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _logits_and_grads(model):
    torch.manual_seed(1)  # the same dropout masks in both runs
    model.zero_grad()
    logits = model(X)
    torch.nn.functional.cross_entropy(logits, Y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,method,sets", [
    ("vit", "full", {}), ("vit", "bias", {}), ("vit", "lora", {"dropout": "0.1"}), ("vit", "ssf", {}),
    ("vit", "adapter", {}), ("vit", "vpt-deep", {"num_tokens": "3", "dropout": "0.1"}), ("vit", "pgn", {}),
    ("vit", "sct", {}), ("swin", "vpt-deep", {"num_tokens": "2"}), ("swin", "lora", {}),
    ("efficientnet", "pro-tuning", {}), ("efficientnet", "sct", {}), ("resnet", "bias", {}),
])
def test_recomputed_activations_give_the_same_gradients(tiny_backbones, kind, method, sets):
    torch.manual_seed(0)
    model = adapt(tiny_backbones(kind), make_config(method, sets, image_size=IMAGE_SIZE), 3).train()
    logits, grads = _logits_and_grads(model)
    with activation_checkpointing(model, True):
        recomputed_logits, recomputed_grads = _logits_and_grads(model)
    assert torch.equal(logits, recomputed_logits)
    assert grads.keys() == recomputed_grads.keys() and len(grads) > 1
    for name, grad in grads.items():
        assert torch.allclose(grad, recomputed_grads[name], rtol=1e-6, atol=1e-6), name


def _saved_bytes(model) -> int:
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(X)
    return sum(storages.values())


@pytest.mark.parametrize("method,sets", [("lora", {}), ("vpt-deep", {"num_tokens": "3"})])
def test_only_block_inputs_stay_saved_and_the_blocks_are_restored_after(method, sets):
    backbone = load_backbone("vit_tiny_patch16_224", random_init=True,
                             model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=2))
    model = adapt(backbone, make_config(method, sets), 3).train()
    stored = _saved_bytes(model)
    with activation_checkpointing(model, True):
        recomputed = _saved_bytes(model)
        assert all("forward" in vars(b) for b in model.backbone.blocks()[:-1])
    assert recomputed < 0.4 * stored  # 5 of 6 blocks keep only their input
    assert not any("forward" in vars(b) for b in model.backbone.blocks())  # the class's forward again
    assert _saved_bytes(model) == stored


def test_grad_checkpoint_is_a_runtime_setting_with_the_same_training_and_artifact(folder, tmp_path):  # noqa: F811
    backbone = tiny_backbone("vit")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    runs = {gc: run_job(job("vit", "lora", folder, tmp_path / str(gc), epochs=2, grad_checkpoint=gc),
                        backbone=backbone, progress=False) for gc in (False, True)}
    for recomputed, stored in zip(without_timing(runs[True]["history"]), without_timing(runs[False]["history"]),
                                  strict=True):
        assert recomputed == pytest.approx(stored, rel=1e-5)
    a, b = (load_file(str(tmp_path / str(gc) / TENSORS)) for gc in (False, True))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert all(torch.equal(v, backbone.model.state_dict()[k]) for k, v in before.items())
    assert not any("forward" in vars(b) for b in runs[True]["model"].backbone.blocks())


def test_the_cli_flag_sets_the_train_config():
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    assert train_config(parser.parse_args(["--grad-checkpoint"])).grad_checkpoint is True
    assert train_config(parser.parse_args([])).grad_checkpoint is False
