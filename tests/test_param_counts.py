"""Tuned-parameter counts equal each method's closed-form formula on a ViT-B/16-shaped model."""
from __future__ import annotations

import pytest

from vistune.backbones import load_backbone
from vistune.methods import adapt, count_parameters, make_config

D, L, C = 768, 12, 100
HEAD = D * C + C
BLOCK = 4 * D * D + 4 * D + 2 * (D * 4 * D) + 4 * D + D + 4 * D  # attn qkv+proj, 2 LayerNorms, MLP


def test_vit_b16_shape(vit_b16):
    assert vit_b16.num_params() == 85_798_656
    assert sum(p.numel() for p in vit_b16.blocks()[0].parameters()) == BLOCK


@pytest.mark.parametrize("name,overrides,expected_excl_head,head", [
    ("linear", {}, 0, HEAD),
    ("full", {}, 85_798_656, HEAD),
    ("partial", {"k": 1}, BLOCK + 2 * D, HEAD),
    ("partial", {"k": 4}, 4 * BLOCK + 2 * D, HEAD),
    ("mlp", {"k": 3}, 0, 2 * (D * D + D + 2 * D) + HEAD),
    ("bias", {}, L * 11 * D + 2 * D, HEAD),  # qkv 3D, proj D, fc1 4D, fc2 D, 2 LN D each; patch-embed + final LN
    ("adapter", {"reduction": 8}, L * (2 * D * (D // 8) + D // 8 + D), HEAD),
    ("adapter", {"reduction": 64}, L * (2 * D * (D // 64) + D // 64 + D), HEAD),
])
def test_tuned_params_formula(vit_b16, name, overrides, expected_excl_head, head):
    counts = count_parameters(adapt(vit_b16, make_config(name, overrides), C))
    assert counts["tuned_params"] == expected_excl_head + head
    assert counts["tuned_params_excluding_head"] == (expected_excl_head if name != "mlp" else 0)
    assert counts["backbone_params"] == 85_798_656


def test_bias_count_is_102912(vit_b16):
    assert count_parameters(adapt(vit_b16, make_config("bias"), C))["tuned_params_excluding_head"] == 102_912


def test_sidetune_formula(vit_b16):
    side = load_backbone("mobilenetv3_small_050", random_init=True)
    side_dim = side.feature_dim
    model = adapt(vit_b16, make_config("sidetune", {"side_network": "mobilenetv3_small_050",
                                                    "side_pretrained": False}), C)
    expected = side.num_params() + side_dim * D + D + 1
    assert count_parameters(model)["tuned_params_excluding_head"] == expected
