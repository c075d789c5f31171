"""SSF: which ops it follows, step 0 = frozen model, y = γ ⊙ op(x) + β (on the op's output or folded, per op type),
what it saves for the backward, and the paper's init."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import ScaledStdConv2d, StdConv2d
from torch.func import functional_call

from conftest import IMAGE_SIZE
from vistune.backbones import load_backbone
from vistune.methods import adapt, make_config
from vistune.methods.ssf import ScaleShift, ssf_ops

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


def _folded_forward(self, *args, **kwargs):
    """The form SSF ran in before vistune 0.2 on every op: the op with γ ⊙ W and γ ⊙ b + β folded in."""
    return functional_call(self.inner, self.folded(), args, kwargs)


def _logits_and_grads(model):
    model.zero_grad()
    logits = model(X)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["vit", "vit_reg_avg", "deit_distilled", "swin", "efficientnet", "resnet",
                                  "convnext", "mobilenet"])
def test_output_side_form_computes_what_the_folded_form_computes(tiny_backbones, kind, monkeypatch):
    torch.manual_seed(0)
    model = adapt(tiny_backbones(kind), make_config("ssf", {"init": "paper"}), 3)
    with torch.no_grad():  # γ and β well away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    logits, grads = _logits_and_grads(model)  # a backward too: no in-place op overwrites a saved output
    monkeypatch.setattr(ScaleShift, "forward", _folded_forward)
    folded_logits, folded_grads = _logits_and_grads(model)
    assert (logits - folded_logits).abs().max() < 1e-5
    for name, grad in grads.items():
        assert torch.allclose(grad, folded_grads[name], rtol=1e-4, atol=1e-5), name  # fp32 summation order


def _saved_bytes(fn, exclude) -> int:
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_a_vit_block_saves_only_the_proj_and_fc2_outputs_more_than_the_frozen_block(tiny_backbones, monkeypatch):
    """qkv's and fc1's scale-shift save their output, which attention (q/k/v views) and the GELU save anyway; proj's
    and fc2's are the only new tensors (plus the norms' folded weight vectors). The folded form saved every op input."""
    backbone = tiny_backbones("vit")
    model = adapt(backbone, make_config("ssf"), 3)
    tokens = torch.randn(3, 17, 32, requires_grad=True)
    exclude = {p.untyped_storage().data_ptr() for p in [*backbone.model.parameters(), *model.parameters(), tokens]}
    frozen = _saved_bytes(lambda: backbone.model.blocks[0](tokens), exclude)
    extra = _saved_bytes(lambda: model.backbone.model.blocks[0](tokens), exclude) - frozen
    token_tensor = tokens.numel() * 4
    assert 2 * token_tensor <= extra <= 2 * token_tensor + 4 * 32 * 4  # + 2 LayerNorms' folded weight and bias
    monkeypatch.setattr(ScaleShift, "forward", _folded_forward)
    assert _saved_bytes(lambda: model.backbone.model.blocks[0](tokens), exclude) - frozen >= 4 * token_tensor


def test_the_scale_shift_keeps_the_ops_precision_under_autocast(tiny_backbones):
    fc1 = adapt(tiny_backbones("vit"), make_config("ssf", {"init": "paper"}), 3).backbone.model.blocks[0].mlp.fc1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fc1(torch.randn(2, 5, fc1.inner.in_features))
    assert out.dtype == torch.bfloat16  # not promoted to fp32 by the fp32 scale


def test_scaled_weight_standardised_convs_scale_their_output_and_merge_into_their_gain():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 6, 3, padding=1)
    wrapper = ScaleShift(conv, "paper")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = conv(x) * wrapper.scale.view(1, -1, 1, 1) + wrapper.shift.view(1, -1, 1, 1)
        assert torch.allclose(wrapper(x), expected, atol=1e-5)
        # γ folded into W (vistune 0.1's form on every op) is undone by the standardisation: not SSF
        folded_into_w = functional_call(conv, {"weight": conv.weight * wrapper.scale.view(-1, 1, 1, 1),
                                               "bias": conv.bias * wrapper.scale + wrapper.shift}, (x,))
        assert not torch.allclose(folded_into_w, expected, atol=1e-3)
        merged = copy.deepcopy(wrapper).merged()
        assert type(merged) is ScaledStdConv2d and torch.allclose(merged(x), expected, atol=1e-5)


def test_weight_standardised_convs_without_a_gain_are_not_ssf_ops():
    model = torch.nn.Sequential(StdConv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4))
    assert ssf_ops(model) == ["1"]


@pytest.mark.parametrize("family", ["swinv2", "naflexvit"])
def test_a_linear_whose_output_is_overwritten_in_place_still_back_propagates(family):
    """Swin V2's cpb_mlp (Linear → ReLU(inplace)) and NaFlexViT's patch embedding (+= position) change a Linear's
    output in place: the saved-output form would raise in the backward, so SSF's probe pass finds those Linears
    and they save op(x); every other Linear keeps the saved-output form; the gradients are the folded form's."""
    from vistune.backbones.catalog import SLOW_FAMILIES, TIMM_FAMILIES

    cfg = {**TIMM_FAMILIES, **SLOW_FAMILIES}[family]
    backbone = load_backbone(cfg.architecture, random_init=True, model_kwargs=cfg.model_kwargs)
    torch.manual_seed(0)
    model = adapt(backbone, make_config("ssf", {"init": "paper"}, image_size=cfg.image_size), 3).eval()
    wrappers = [m for m in model.modules() if isinstance(m, ScaleShift) and isinstance(m.inner, torch.nn.Linear)]
    overwritten = [w for w in wrappers if w.output_overwritten]
    assert overwritten and len(overwritten) < len(wrappers)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()  # raised before
    assert all(w.scale.grad is not None for w in overwritten)
