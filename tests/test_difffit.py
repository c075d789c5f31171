"""DiffFit: the ViT-B/16 count, γ on the residual branches (pre-norm: attn.proj / mlp.fc2 outputs; post-norm Swin V2:
norm1 / norm2 outputs) against the block written out by hand, and the merged model."""
from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_SIZE
from vistune.backbones import load_backbone
from vistune.merge import merge
from vistune.methods import adapt, count_parameters, make_config
from vistune.methods.difffit import BranchScale
from vit_math import block_math, cls_feature, embed

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def test_vit_b16_count(vit_b16):
    # OSU-MLB/PETL_Vision's DiffFit on ViT-B/16 (model/block.py, experiment/build_model.py: 'bias' and 'norm'
    # parameters + γ₁, γ₂ ∈ R^768 per block): BitFit's 102,912 + the 25 LayerNorm weights + 2·12 γ
    counts = count_parameters(adapt(vit_b16, make_config("difffit"), 100))
    assert counts["tuned_params_excluding_head"] == 102_912 + 25 * 768 + 2 * 12 * 768 == 140_544


def _randomised(backbone):
    torch.manual_seed(0)
    model = adapt(backbone, make_config("difffit"), 3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def test_forward_scales_each_residual_branch(tiny_backbones):
    model = _randomised(tiny_backbones("vit"))
    vit = model.backbone.model
    gammas = [(b.attn.gamma, b.mlp.gamma) for b in vit.blocks]
    assert all(isinstance(b.attn, BranchScale) and isinstance(b.mlp, BranchScale) for b in vit.blocks)

    def reference(scales):
        x = embed(vit, X)
        for block, gamma in zip(vit.blocks, scales):
            inner = type("Block", (), {"attn": block.attn.inner, "mlp": block.mlp.inner, "norm1": block.norm1,
                                        "norm2": block.norm2})  # the stock modules with the tuned biases and norms
            x = block_math(inner, x, gamma=gamma)
        return model.head(cls_feature(vit, x))

    with torch.no_grad():
        logits = model(X)
        assert (logits - reference(gammas)).abs().max() < 1e-5
        assert (logits - reference([(1.0, 1.0)] * len(gammas))).abs().max() > 1e-2  # negative control: no γ


def test_trains_biases_norms_and_gammas_only(tiny_backbones):
    model = adapt(tiny_backbones("vit"), make_config("difffit"), 3)
    trained = {n.removeprefix("backbone.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trained if "gamma" in n} == {f"blocks.{i}.{p}.gamma" for i in range(2) for p in ("attn", "mlp")}
    rest = trained - {n for n in trained if "gamma" in n or n.startswith("head.")}
    assert rest and all("bias" in n or n.endswith(("norm1.weight", "norm2.weight", "norm.weight")) for n in rest)


def test_post_norm_blocks_scale_their_norms_and_everything_merges(tiny_backbones):
    swinv2 = load_backbone("swinv2_tiny_window8_256", random_init=True, model_kwargs=dict(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)))
    for backbone, wrapped in ((swinv2, ("norm1", "norm2")), (tiny_backbones("vit"), ("attn", "mlp"))):
        model = _randomised(backbone)
        block = model.backbone.blocks()[0]
        assert all(isinstance(getattr(block, part), BranchScale) for part in wrapped)
        with torch.no_grad():
            merged = merge(model)
            assert (merged(X) - model(X)).abs().max() < 1e-5
        assert not any(isinstance(m, BranchScale) for m in merged.modules())
