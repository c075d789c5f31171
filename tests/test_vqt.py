"""VQT: the ViT-B/16 count, the query path written out by hand (queries read the block's tokens, nothing reads them),
the frozen trunk untouched and outside autograd, and the families it refuses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import IMAGE_SIZE
from vistune.errors import VistuneError
from vistune.methods import adapt, count_parameters, make_config
from vit_math import attend, block_math, cls_feature, embed, heads, layer_norm, merge_heads

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def test_vit_b16_count(vit_b16):
    # official andytu28/VQT: query_prompt_embeddings (12, T, 768) and a head on 768 + 768·12·T features (T = 1)
    counts = count_parameters(adapt(vit_b16, make_config("vqt"), 100))
    assert counts["tuned_params_excluding_head"] == 12 * 1 * 768 == 9_216
    assert counts["tuned_params"] - 9_216 == (768 + 12 * 768) * 100 + 100


def _query_outputs(block, queries, tokens):
    """Block math for the query rows: keys and values from LN₁(tokens) only."""
    a, m, n = block.attn, block.mlp, block.attn.num_heads
    d = queries.shape[-1]
    w, b = a.qkv.weight, a.qkv.bias
    q = heads(layer_norm(queries, block.norm1) @ w[:d].t() + b[:d], n)
    h = layer_norm(tokens, block.norm1)
    k, v = heads(h @ w[d:2 * d].t() + b[d:2 * d], n), heads(h @ w[2 * d:].t() + b[2 * d:], n)
    x = queries + merge_heads(attend(q, k, v)) @ a.proj.weight.t() + a.proj.bias
    return x + F.gelu(layer_norm(x, block.norm2) @ m.fc1.weight.t() + m.fc1.bias) @ m.fc2.weight.t() + m.fc2.bias


def test_forward_matches_the_query_path_by_hand(tiny_backbones):
    torch.manual_seed(0)
    model = adapt(tiny_backbones("vit"), make_config("vqt", {"num_queries": 2}), 3).eval()
    vit = model.backbone.model
    tokens, outs = embed(vit, X), []
    for block, q in zip(vit.blocks, model.queries):
        outs.append(_query_outputs(block, q.expand(2, -1, -1), tokens).flatten(1))
        tokens = block_math(block, tokens)  # the trunk: the stock block, untouched by the queries
    feature = torch.cat([F.normalize(cls_feature(vit, tokens), dim=-1)] + [F.normalize(o, dim=-1) for o in outs], -1)
    with torch.no_grad():
        assert (model(X) - model.head(feature)).abs().max() < 1e-5
        # negative control: queries that also attend to themselves (VPT-style tokens) compute something else
        own = [F.normalize(_query_outputs(b, q.expand(2, -1, -1), torch.cat([q.expand(2, -1, -1), t], 1)).flatten(1),
                           dim=-1) for b, q, t in zip(vit.blocks, model.queries, _block_inputs(vit))]
        assert (model.features(X) - torch.cat([feature[:, :32], *own], -1)).abs().max() > 1e-3


def _block_inputs(vit):
    tokens, inputs = embed(vit, X), []
    for block in vit.blocks:
        inputs.append(tokens)
        tokens = block_math(block, tokens)
    return inputs


def _saved_bytes(model) -> int:
    """Bytes of activations autograd keeps for the backward of one training forward (the parameters it also
    keeps a reference to cost nothing extra, so tensors sharing a parameter's storage are not counted)."""
    total = [0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(X).sum()
    return total[0]


def test_the_trunk_stays_the_frozen_model_and_outside_autograd(tiny_backbones):
    backbone = tiny_backbones("vit")
    model = adapt(backbone, make_config("vqt"), 3)
    model.train()
    feature = model.features(X)
    with torch.no_grad():
        frozen = F.normalize(backbone.forward_features(X), dim=-1)
    assert torch.equal(feature[:, :32], frozen)  # the pooled part is the bare backbone's
    grad_queries, = torch.autograd.grad(feature[:, 32:].sum(), [model.queries])
    assert grad_queries.abs().sum() > 0
    # backward keeps only the query rows' activations (and the tokens' keys/values): far less than VPT-deep's
    vpt = adapt(backbone, make_config("vpt-deep", {"num_tokens": 1}), 3)
    assert _saved_bytes(model) < 0.5 * _saved_bytes(vpt)


def test_refuses_attention_it_cannot_extend(tiny_backbones):
    with pytest.raises(VistuneError, match="does not support the generic family"):
        adapt(tiny_backbones("efficientnet"), make_config("vqt"), 3)
    with pytest.raises(VistuneError, match="does not support the swin family"):
        adapt(tiny_backbones("swin"), make_config("vqt"), 3)
