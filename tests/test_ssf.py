"""SSF: which ops it follows, step 0 = frozen model, y = γ ⊙ op(x) + β, and the paper's init."""
from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_SIZE
from vistune.methods import adapt, make_config
from vistune.methods.ssf import ScaleShift

X = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _wrapped(model) -> set[str]:
    return {n.removeprefix("backbone.model.") for n, m in model.named_modules() if isinstance(m, ScaleShift)}


def test_ssf_follows_every_op_with_a_bias_and_every_norm_on_vit(tiny_backbones):
    model = adapt(tiny_backbones("vit"), make_config("ssf"), 3)
    per_block = {"norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"}
    assert _wrapped(model) == {"patch_embed.proj", "norm"} | {f"blocks.{i}.{n}" for i in range(2) for n in per_block}


def test_ssf_skips_bias_free_ops_and_wraps_norm_act_modules(tiny_backbones):
    swin = _wrapped(adapt(tiny_backbones("swin"), make_config("ssf"), 3))
    assert not any(n.endswith("reduction") for n in swin)  # Swin's patch merging has no bias
    assert any(n.endswith("downsample.norm") for n in swin)
    lite0 = _wrapped(adapt(tiny_backbones("efficientnet"), make_config("ssf"), 3))
    assert "bn1" in lite0 and "blocks.0.0.bn1" in lite0  # timm BatchNormAct2d: scale/shift before the act
    assert not any("conv" in n for n in lite0)  # bias-free convs: their BatchNorm carries SSF


@pytest.mark.parametrize("kind", ["vit", "swin", "efficientnet", "convnext"])
def test_step_zero_is_exactly_the_frozen_model(tiny_backbones, kind):
    backbone = tiny_backbones(kind)
    model = adapt(backbone, make_config("ssf"), 3).eval()
    with torch.no_grad():
        assert torch.equal(model.features(X), backbone.forward_features(X))


def test_scale_and_shift_act_on_the_ops_output_channels(tiny_backbones):
    model = adapt(tiny_backbones("efficientnet"), make_config("ssf", {"init": "paper"}), 3)
    for name in ("blocks.0.0.bn1", "bn2"):  # timm BatchNormAct2d: norm, then scale/shift, then the act
        wrapper = model.backbone.model.get_submodule(name)
        inner = wrapper.inner
        x = torch.randn(2, inner.num_features, 4, 4)
        bn_only = torch.nn.functional.batch_norm(x, inner.running_mean, inner.running_var, inner.weight,
                                                 inner.bias, False, 0.0, inner.eps)
        expected = inner.act(bn_only * wrapper.scale.view(1, -1, 1, 1) + wrapper.shift.view(1, -1, 1, 1))
        with torch.no_grad():
            assert torch.allclose(wrapper(x), expected, atol=1e-5)
    vit = adapt(tiny_backbones("vit"), make_config("ssf", {"init": "paper"}), 3)
    fc1 = vit.backbone.model.blocks[0].mlp.fc1
    tokens = torch.randn(2, 5, fc1.inner.in_features)
    with torch.no_grad():
        assert torch.allclose(fc1(tokens), fc1.inner(tokens) * fc1.scale + fc1.shift, atol=1e-6)


def test_paper_init_draws_around_identity(tiny_backbones):
    torch.manual_seed(0)
    model = adapt(tiny_backbones("vit"), make_config("ssf", {"init": "paper"}), 3)
    scales = torch.cat([m.scale for m in model.modules() if isinstance(m, ScaleShift)])
    shifts = torch.cat([m.shift for m in model.modules() if isinstance(m, ScaleShift)])
    assert 0.01 < scales.std() < 0.03 and abs(scales.mean() - 1) < 0.01
    assert 0.01 < shifts.std() < 0.03 and abs(shifts.mean()) < 0.01
