"""VPT: placement, discarding in deep mode, exact counts, Swin prompts, pad prompts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vistune.methods import adapt, count_parameters, make_config
from vistune.methods.vpt import PromptedWindowAttention

X = torch.randn(2, 3, 32, 32)


def _vpt(backbone, name, **sets):
    torch.manual_seed(0)
    return adapt(backbone, make_config(name, sets), 5).eval()


@pytest.mark.parametrize("name,expected", [("vpt-shallow", 38_400), ("vpt-deep", 460_800)])
def test_vit_b16_prompt_counts(vit_b16, name, expected):
    counts = count_parameters(adapt(vit_b16, make_config(name, {"num_tokens": 50}), 100))
    assert counts["tuned_params_excluding_head"] == expected
    assert counts["tuned_params"] == expected + 768 * 100 + 100


def test_vit_b16_prompt_projection_count(vit_b16):
    counts = count_parameters(adapt(vit_b16, make_config("vpt-deep", {"num_tokens": 50, "project_dim": 64}), 100))
    assert counts["tuned_params_excluding_head"] == 12 * 50 * 64 + 64 * 768 + 768


def test_uniform_init_bound_is_vpt_value(vit_b16):
    model = adapt(vit_b16, make_config("vpt-shallow", {"num_tokens": 50}), 10)
    bound = math.sqrt(6 / (3 * 16 * 16 + 768))
    assert bound == pytest.approx(0.0625)
    prompt = model.prompts[0]
    assert prompt.abs().max() <= bound and prompt.abs().max() > 0.9 * bound


def test_vpt_head_init(tiny_backbones):
    model = _vpt(tiny_backbones("vit"), "vpt-deep", head_init="vpt")
    assert torch.allclose(model.head.bias, torch.full((5,), -4.59511985013459))


@pytest.mark.parametrize("kind", ["vit", "vit_reg_avg", "deit_distilled"])
def test_deep_forward_by_hand(tiny_backbones, kind):
    """Recompute VPT-deep from the stock timm pieces and compare logits."""
    model = _vpt(tiny_backbones(kind), "vpt-deep", num_tokens=4)
    vit = model.backbone.model
    n_prefix = vit.num_prefix_tokens
    with torch.no_grad():
        x = vit.patch_embed(X)
        prefix = [t.expand(2, -1, -1) for t in (vit.cls_token, vit.reg_token, getattr(vit, "dist_token", None))
                  if t is not None]
        if vit.no_embed_class:
            x = torch.cat(prefix + [x + vit.pos_embed], 1)
        else:
            x = torch.cat(prefix + [x], 1) + vit.pos_embed
        x = vit.norm_pre(x)
        for i, block in enumerate(vit.blocks):
            prompts = model.prompts[i].unsqueeze(0).expand(2, -1, -1)
            x = torch.cat([x[:, :n_prefix], prompts, x[:, n_prefix + (4 if i else 0):]], 1)
            x = block(x)
        x = vit.norm(torch.cat([x[:, :n_prefix], x[:, n_prefix + 4:]], 1))
        if vit.global_pool == "avg":
            feat = x[:, n_prefix:].mean(1)
        elif kind == "deit_distilled":  # DeiT averages its CLS and distillation tokens
            feat = (x[:, 0] + x[:, 1]) / 2
        else:
            feat = x[:, 0]
        expected = model.head(vit.fc_norm(feat))
        assert torch.allclose(model(X), expected, atol=1e-5)


def _perturb_prompt_outputs(block, n_prefix, p):
    # random per-channel noise: a constant shift of a token would be erased by the next LayerNorm
    def hook(module, inputs, output):
        output = output.clone()
        noise = torch.randn(output[:, n_prefix:n_prefix + p].shape, generator=torch.Generator().manual_seed(0))
        output[:, n_prefix:n_prefix + p] += 10.0 * noise
        return output

    return block.register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["vit", "vit_reg_avg"])
def test_deep_discards_previous_prompt_outputs(tiny_backbones, kind):
    model = _vpt(tiny_backbones(kind), "vpt-deep", num_tokens=3)
    n_prefix = model.backbone.num_prefix_tokens
    with torch.no_grad():
        clean = model(X)
        handle = _perturb_prompt_outputs(model.backbone.blocks()[0], n_prefix, 3)
        perturbed = model(X)
        handle.remove()
    assert torch.equal(clean, perturbed)


def test_shallow_prompts_do_travel_through_blocks(tiny_backbones):
    model = _vpt(tiny_backbones("vit"), "vpt-shallow", num_tokens=3)
    with torch.no_grad():
        clean = model(X)
        handle = _perturb_prompt_outputs(model.backbone.blocks()[0], 1, 3)
        perturbed = model(X)
        handle.remove()
    assert not torch.allclose(clean, perturbed)


def test_prompt_outputs_never_enter_avg_pooling(tiny_backbones):
    model = _vpt(tiny_backbones("vit_reg_avg"), "vpt-shallow", num_tokens=3)
    n_prefix = model.backbone.num_prefix_tokens
    with torch.no_grad():
        clean = model(X)
        handle = _perturb_prompt_outputs(model.backbone.blocks()[-1], n_prefix, 3)
        perturbed = model(X)
        handle.remove()
    assert torch.equal(clean, perturbed)


def test_vit_attention_stays_timm_own(tiny_backbones):
    backbone = tiny_backbones("vit")
    stock = type(backbone.blocks()[0].attn)
    model = _vpt(backbone, "vpt-deep")
    assert all(type(b.attn) is stock for b in model.backbone.blocks())


def test_swin_prompted_attention_matches_naive_math(tiny_backbones):
    """Prompts as extra keys/values: compare the fused path with plain softmax attention."""
    model = _vpt(tiny_backbones("swin"), "vpt-deep", num_tokens=3)
    block = model.backbone.blocks()[0]
    wrapped: PromptedWindowAttention = block.attn
    a = wrapped.inner
    n = a.window_area
    x = torch.randn(4, n, a.qkv.in_features)
    mask = torch.zeros(2, n, n)
    mask[1, :, : n // 2] = -100.0
    with torch.no_grad():
        got = wrapped(x, mask)
        prompts = wrapped.norm.value(wrapped.prompts.value)
        heads = a.num_heads
        q, k, v = a.qkv(x).reshape(4, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        _, pk, pv = a.qkv(prompts).reshape(3, 3, heads, -1).permute(1, 2, 0, 3)
        k = torch.cat([pk.expand(4, -1, -1, -1), k], 2)
        v = torch.cat([pv.expand(4, -1, -1, -1), v], 2)
        logits = (q * a.scale) @ k.transpose(-2, -1)
        bias = a._get_rel_pos_bias() + mask.repeat(2, 1, 1).unsqueeze(1)
        logits = logits + F.pad(bias, (3, 0))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(4, n, -1)
        expected = a.proj(out)
    assert torch.allclose(got, expected, atol=1e-5)


def test_swin_prompt_counts_follow_stage_widths(tiny_backbones):
    backbone = tiny_backbones("swin")  # stages of width 16 and 32, one block each
    deep = count_parameters(adapt(backbone, make_config("vpt-deep", {"num_tokens": 4}), 5))
    shallow = count_parameters(adapt(backbone, make_config("vpt-shallow", {"num_tokens": 4}), 5))
    assert deep["tuned_params_excluding_head"] == 4 * 16 + 4 * 32
    assert shallow["tuned_params_excluding_head"] == 4 * 16


def test_swin_prompted_attention_borrows_the_frozen_norm(tiny_backbones):
    """The wrapper reads the block's norm1 but does not own it: the artifact holds no copy of the frozen norm
    (loading one onto a shared backbone would overwrite the backbone's own)."""
    model = adapt(tiny_backbones("swin"), make_config("vpt-deep", {"num_tokens": 2}), 5)
    wrapper = model.backbone.blocks()[0].attn
    assert wrapper.norm.value is model.backbone.blocks()[0].norm1
    assert not [k for k in model.tuned_state_dict() if "norm" in k]


@pytest.mark.parametrize("canvas,size", [("shrink", 32), ("grow", 36)])
def test_pad_prompts(tiny_backbones, canvas, size):
    model = _vpt(tiny_backbones("efficientnet"), "vpt-pad", width=2, image_size=32, canvas=canvas)
    padded = model.prompt(X)
    assert padded.shape[-2:] == (size, size)
    inner = 28 if canvas == "shrink" else 32
    assert count_parameters(model)["tuned_params_excluding_head"] == 3 * (size * size - inner * inner)
    # the border is the prompt, the middle is the (resized) image
    assert torch.equal(padded[:, :, :2, :], model.pad_tb[:, :, :2].expand(2, -1, -1, -1))
    if canvas == "grow":
        assert torch.equal(padded[:, :, 2:-2, 2:-2], X)


@pytest.mark.slow
def test_pad_prompts_beat_linear_probe_on_real_imagenet_lite0():
    """Real ImageNet EfficientNet-Lite0 → real sklearn digits, 800 train / 200 val / 359 test, 64 px, 10 epochs.
    lrs are the val-selected ones of `benchmarks/transfer.py` (docs/methods.md): linear 0.1, vpt-pad 0.5.
    Measured 2026-11-23, test top-1: 2-core CPU linear 0.883, vpt-pad 0.925 (70 s); one H100 0.916 / 0.961.
    Re-measured after the trainer's shuffle became a global permutation sliced per process (DDP): 2-core CPU
    linear 0.891, vpt-pad 0.903 — the margin depends on the shuffle order, so the test asks for a win, not +2."""
    from vistune.backbones import load_backbone
    from vistune.data import load_data
    from vistune.run import Job, preprocessing_for, run_job, transforms_for
    from vistune.training import TrainConfig

    backbone = load_backbone("tf_efficientnet_lite0")
    probe = Job(backbone="tf_efficientnet_lite0", method="linear", data="digits", image_size=64)
    tr, ev = transforms_for(preprocessing_for(backbone, probe))
    data = load_data("digits", train_transform=tr, eval_transform=ev, train_size=800, val_size=200, seed=0)
    acc = {}
    for method, lr in (("linear", 0.1), ("vpt-pad", 0.5)):
        job = Job(backbone="tf_efficientnet_lite0", method=method, data="digits", image_size=64,
                  overrides={"width": 4} if method == "vpt-pad" else {},
                  train=TrainConfig(epochs=10, batch_size=32, lr=lr, optimizer="sgd", seed=0))
        acc[method] = run_job(job, backbone=backbone, data=data, progress=False)["test_accuracy"]
    assert acc["linear"] >= 0.83
    assert acc["vpt-pad"] >= acc["linear"] + 0.005


@pytest.mark.parametrize("name", ["vpt-shallow", "vpt-deep"])
def test_prompt_dropout_draws_a_mask_per_sample(tiny_backbones, name):
    """In training, each sample's prompts are dropped independently (the official code drops after expanding the
    prompts to the batch); one mask shared by the batch would give every sample the same zeros."""
    model = _vpt(tiny_backbones("vit"), name, num_tokens=4, dropout=0.5)
    n_prefix, batch = model.backbone.num_prefix_tokens, 8
    blocks = model.backbone.blocks()[: len(model.prompts)]
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, n_prefix:n_prefix + 4]))
               for b in blocks]
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)
        model.eval()(x)
    for h in handles:
        h.remove()
    trained, evaluated = seen[: len(blocks)], seen[len(blocks):]
    for prompt, got, clean in zip(model.prompts, trained, evaluated):
        kept = got != 0
        assert torch.allclose(got[kept], (prompt.expand(batch, -1, -1) / 0.5)[kept])  # inverted dropout, p = 0.5
        assert 0.3 < kept.float().mean() < 0.7
        assert len({tuple(m.flatten().tolist()) for m in kept}) == batch  # 8 different masks, one per sample
        assert torch.equal(clean, prompt.expand(batch, -1, -1))  # no dropout in eval


def test_swin_prompt_dropout_draws_a_mask_per_window(tiny_backbones):
    """Swin's prompts are keys/values of every window: in training each window gets its own dropout mask (one
    mask shared by all windows and images would drop the same prompt entries everywhere); eval drops nothing."""
    model = _vpt(tiny_backbones("swin"), "vpt-shallow", num_tokens=3, dropout=0.5)
    attn = model.backbone.blocks()[0].attn
    seen = []
    p = model.prompts[0].shape[0]
    handle = attn.norm.value.register_forward_pre_hook(  # norm1 also normalises the patch tokens (NHWC): skip those
        lambda m, args: seen.append(args[0]) if args[0].ndim < 4 and args[0].shape[-2] == p else None)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)
        model.eval()(x)
    handle.remove()
    trained, clean = seen[0], seen[-1]
    prompt = model.prompts[0]
    assert trained.ndim == 3 and trained.shape[1:] == prompt.shape  # (windows, p, C)
    kept = trained != 0
    assert torch.allclose(trained[kept], (prompt.expand_as(trained) / 0.5)[kept])
    assert len({tuple(m.flatten().tolist()) for m in kept}) == trained.shape[0]
    assert torch.equal(clean, prompt.unsqueeze(0))
