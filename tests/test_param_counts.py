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


# ---- weight-space methods (peft, SSF): Q and V of the fused qkv, 12 blocks ----
@pytest.mark.parametrize("name,overrides,expected", [
    ("lora", {"r": 8}, L * 2 * (8 * D + D * 8)),  # = 294,912: A (r×D) and B (D×r) on W_q and W_v
    ("lora", {"r": 8, "targets": "qkv"}, L * 3 * (8 * D + D * 8)),
    ("lora", {"r": 4, "targets": "attn+mlp"}, L * (4 * 2 * 4 * D + 2 * 4 * (D + 4 * D))),
    ("dora", {"r": 8}, L * 2 * (8 * D + D * 8 + D)),  # + one magnitude per output row
    ("ia3", {}, L * (D + D + 4 * D)),  # k and v outputs, fc2's 4D-wide input
    ("ln-tuning", {}, (2 * L + 1) * 2 * D),  # norm1, norm2 per block and the final norm
    ("ssf", {}, (L * (3 + 1 + 4 + 1 + 1 + 1) + 1 + 1) * 2 * D),  # qkv, proj, fc1, fc2, 2 LNs; patch embed, norm
    ("vera", {}, L * 2 * (256 + D)),  # = 24,576: d (r = 256) and b (D) on W_q, W_v (VeRA paper Table 4: 24.6K)
    ("fourierft", {}, L * 2 * 3000),  # = 72,000: n = 3000 on W_q, W_v (FourierFT paper, ViT-B: 72K)
    ("oft", {}, L * 2 * (D // 32) * (32 * 31 // 2)),  # = 285,696: 24 skew blocks of b = 32 (peft's storage)
    ("boft", {}, L * 2 * ((D // 4) * 4 * 4 + D)),  # = 92,160: one factor of 192 4×4 blocks + s (peft's storage)
])
def test_weight_space_formulas(vit_b16, name, overrides, expected):
    counts = count_parameters(adapt(vit_b16, make_config(name, overrides), C))
    assert counts["tuned_params_excluding_head"] == expected
    assert counts["tuned_params"] == expected + HEAD


def test_lora_qv_count_is_294912_and_ssf_205824(vit_b16):
    assert count_parameters(adapt(vit_b16, make_config("lora"), C))["tuned_params_excluding_head"] == 294_912
    assert count_parameters(adapt(vit_b16, make_config("ssf"), C))["tuned_params_excluding_head"] == 205_824


# ---- the adapter family at each paper's / official code's default setting (ViT-B/16, 12 blocks, D = 768) ----
@pytest.mark.parametrize("name,overrides,expected", [
    # AdaptFormer, official code (models/custom_modules.py: ffn_num=64): down D·64 + 64, up 64·D + D per block
    ("adaptformer", {}, L * (2 * D * 64 + 64 + D)),  # = 1,189,632
    # at h = 8: the "AdaptFormer 0.16" (M) row of the Convpass report's Table 1 (VTAB-1k, h = 8 for all adapters)
    ("adaptformer", {"bottleneck": 8}, L * (2 * D * 8 + 8 + D)),  # = 156,768
    # Convpass report §3.2: 2L((2h + 1)d + 9h² + 2h) with h = 8; its Table 1: "Convpass 0.33" (M)
    ("convpass", {}, 2 * L * ((2 * 8 + 1) * D + 9 * 8 ** 2 + 2 * 8)),  # = 327,552
    # Houlsby et al. §2.1: 2md + d + m per adapter, two per layer (h = m = 8), + every LayerNorm (2L + 1 of them)
    ("houlsby", {}, L * 2 * (2 * 8 * D + D + 8) + (2 * L + 1) * 2 * D),  # = 313,536 + 38,400 = 351,936
    # Adapter+, official config (conf/adapter/adapter_plus.yaml, dim 8): down, up, channel scale D, one per block
    ("adapter-plus", {}, L * (2 * 8 * D + 8 + D + D)),  # = 165,984
    # RepAdapter, official code (repadapter.py: hidden_dim 8, groups 2, before attn and mlp): A D·8 + 8, B D·4 + D
    ("repadapter", {}, L * 2 * (D * 8 + 8 + D * 8 // 2 + D)),  # = 239,808 (221,184 weights + 18,624 biases)
])
def test_adapter_family_formulas(vit_b16, name, overrides, expected):
    counts = count_parameters(adapt(vit_b16, make_config(name, overrides), C))
    assert counts["tuned_params_excluding_head"] == expected
    assert counts["tuned_params"] == expected + HEAD

