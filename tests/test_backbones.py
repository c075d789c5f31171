"""The views: the generic view's stages/blocks/layouts on stock timm models, and the token/window seams of the
EVA, BEiT and Swin V2 family views (tiny random-weight models, no download)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vistune.backbones import BackboneView, BeitView, EvaView, SwinV2View, ViTView, load_backbone
from vistune.backbones.catalog import SLOW_FAMILIES, TIMM_FAMILIES
from vistune.backbones.swin import PromptedWindowAttentionV2, v2_position_bias
from vistune.errors import VistuneError
from vistune.methods import METHODS, adapt, make_config

X = torch.randn(2, 3, 32, 32)


def _tiny(family: str):
    cfg = {**TIMM_FAMILIES, **SLOW_FAMILIES}[family]
    return load_backbone(cfg.architecture, random_init=True, model_kwargs=cfg.model_kwargs)


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _tiny(family)
        return cache[family]

    return get


@pytest.mark.parametrize("family,view", [("vit", ViTView), ("vit-hybrid", ViTView), ("eva02", EvaView),
                                         ("vit-rope", EvaView), ("beit", BeitView), ("swinv2", SwinV2View),
                                         ("regnet", BackboneView), ("caformer", BackboneView)])
def test_each_model_gets_its_family_view_or_the_generic_one(tiny, family, view):
    assert type(tiny(family)) is view


def test_generic_stages_and_blocks_are_the_cnn_stages_and_blocks(tiny):
    """What the former CNN view found (EfficientNet: all 7 block stages; ResNet: layer1-4; ConvNeXt: stages)."""
    lite0 = tiny("efficientnet")
    assert lite0.stage_names() == [f"blocks.{i}" for i in range(7)]
    assert lite0.blocks() == [b for stage in lite0.model.blocks for b in stage]
    assert set(lite0.final_modules()) == {"conv_head", "bn2"}
    resnet = tiny("resnet")
    assert resnet.stage_names() == ["layer1", "layer2", "layer3", "layer4"] and resnet.final_modules() == {}
    convnext = tiny("convnext")
    assert convnext.stage_names() == [f"stages.{i}" for i in range(4)]
    assert convnext.blocks() == [b for s in convnext.model.stages for b in s.blocks]
    assert "head" in convnext.final_modules()  # its norm (the classifier itself was reset to Identity)
    regnet = tiny("regnet")  # RegStage holds b1, b2, … (no Sequential): its blocks are those children
    assert regnet.stage_names() == ["s1", "s2", "s3", "s4"]
    assert len(regnet.blocks()) == sum(len(list(s.children())) for s in regnet.stages())


@pytest.mark.parametrize("family,kind", [("efficientnet", "nchw"), ("mambaout", "nhwc"), ("sequencer", "nhwc"),
                                         ("hiera", "tokens"), ("levit", "tokens"), ("maxvit", "nchw")])
def test_stage_layouts_are_read_off_the_forward(tiny, family, kind):
    backbone = tiny(family)
    layouts = backbone.layouts(backbone.stages())
    assert {layout.kind for layout in layouts} == {kind}
    assert [layout.channels for layout in layouts][-1] in (backbone.feature_dim, *[
        f["num_chs"] for f in backbone.model.feature_info])


def test_tuple_outputs_and_missing_feature_levels_refuse_clearly(tiny):
    with pytest.raises(VistuneError, match="outputs no single tensor"):
        adapt(tiny("pit"), make_config("pro-tuning"), 3)
    with pytest.raises(VistuneError, match="names no feature levels that are modules"):
        adapt(tiny("twins"), make_config("partial"), 3)
    with pytest.raises(VistuneError, match="a token sequence, not a 2-D feature map"):
        adapt(tiny("hiera"), make_config("pro-tuning"), 3)


@pytest.mark.parametrize("family", ["vit", "eva02", "eva", "vit-rope", "beit", "beitv2"])
def test_token_seam_without_prompts_is_the_stock_forward(tiny, family):
    backbone = tiny(family)
    with torch.no_grad():
        stock = backbone.forward_features(X)
        seam = backbone.forward_tokens(X, torch.zeros(2, 0, backbone.embed_dim))
    assert torch.allclose(stock, seam, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "eva02", "vit-rope", "beit", "beitv2"])
def test_prompts_have_no_position(tiny, family):
    """No absolute, rotary (EVA) or relative (BEiT) position for prompts: their order cannot matter."""
    backbone = tiny(family)
    torch.manual_seed(0)
    prompts = torch.randn(2, 4, backbone.embed_dim)
    with torch.no_grad():
        a = backbone.forward_tokens(X, prompts)
        b = backbone.forward_tokens(X, prompts.flip(1))
        c = backbone.forward_features(X)
    assert torch.allclose(a, b, atol=1e-5) and not torch.equal(a, c)  # (vit-rope: layer scale 1e-5 at init)


def _swinv2_naive(a, x, prompt_tokens, mask):
    b, n, _ = x.shape
    heads = a.num_heads
    qkv_bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
    q, k, v = F.linear(x, a.qkv.weight, qkv_bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    if prompt_tokens is not None:
        p = prompt_tokens.shape[0]
        _, pk, pv = F.linear(prompt_tokens, a.qkv.weight, qkv_bias).reshape(p, 3, heads, -1).permute(1, 2, 0, 3)
        k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
        v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logits = logits * torch.clamp(a.logit_scale, max=math.log(100.0)).exp()
    bias = v2_position_bias(a).unsqueeze(0) + mask.repeat(b // mask.shape[0], 1, 1).unsqueeze(1)
    logits = logits + F.pad(bias, (logits.shape[-1] - n, 0))
    return a.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


def test_swinv2_prompted_cosine_attention_matches_naive_math(tiny):
    backbone = tiny("swinv2")
    model = adapt(backbone, make_config("vpt-deep", {"num_tokens": 3}), 3)
    wrapped = model.backbone.blocks()[0].attn
    assert isinstance(wrapped, PromptedWindowAttentionV2)
    a = wrapped.inner
    n = a.window_size[0] * a.window_size[1]
    x = torch.randn(4, n, a.qkv.in_features)
    mask = torch.zeros(2, n, n)
    mask[1, :, : n // 2] = -100.0
    with torch.no_grad():
        assert torch.allclose(a(x, mask), _swinv2_naive(a, x, None, mask), atol=1e-5)  # the naive math is V2's
        got = wrapped(x, mask)
        expected = _swinv2_naive(a, x, wrapped.prompts.value, mask)
    assert torch.allclose(got, expected, atol=1e-5)


def test_families_column_is_generated_from_the_needs():
    assert METHODS["pgn"].families == ("vit", "eva", "beit")
    assert METHODS["vpt-shallow"].families == ("vit", "eva", "beit", "swin", "swinv2")
    assert all((info.families == ("any",)) == (not info.needs) for info in METHODS.values())


def test_peft_on_attention_that_reads_its_qkv_weight(tiny):
    """EVA-02's attention computes q/k/v with F.linear(x, qkv.weight, q/v bias): auto falls back to the MLP,
    explicit q/v targets refuse (a peft layer there would never run)."""
    backbone = tiny("eva02")
    model = adapt(backbone, make_config("lora"), 3)
    assert set(model.targets.values()) == {"fc1", "fc2"}
    with pytest.raises(VistuneError, match="would never run"):
        adapt(backbone, make_config("lora", {"targets": "qv"}), 3)
    assert set(adapt(tiny("vit"), make_config("lora"), 3).targets.values()) == {"q", "v"}
