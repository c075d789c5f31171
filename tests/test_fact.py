"""FacT-TT and FacT-TK: the ViT-B/16 count (the paper's Table 1 averages from the official configs), the forward
against the factorised increments written out by hand as the official code builds them, and the merged model."""
from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_SIZE
from vistune.merge import merge
from vistune.methods import adapt, count_parameters, make_config
from vistune.methods.fact import FacTLinear
from vit_math import block_math, cls_feature, embed

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
D, L = 768, 12
# the per-task ranks of the official configs (JieShibo/PETL-ViT FacT/configs/{tt,tk}/*.yaml, the 19 VTAB-1k tasks)
OFFICIAL_RANKS = {"fact-tt": [16, 8, 16, 4, 8, 16, 16, 16, 8, 8, 16, 16, 8, 8, 8, 16, 8, 8, 16],
                  "fact-tk": [32, 32, 32, 16, 16, 32, 32, 32, 16, 32, 32, 32, 16, 32, 32, 32, 16, 16, 32]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _closed_form(name: str, r: int) -> int:
    """U (D×r) and V (r×D) shared; TT: a core of 12 r² per block (q,k,v,proj r² each, fc1 and fc2 4 r² each);
    TK: one r³ core and P with 12 columns per block."""
    return 2 * D * r + (L * 12 * r * r if name == "fact-tt" else r ** 3 + 12 * L * r)


@pytest.mark.parametrize("name,ranks,paper_mean", [("fact-tt", (4, 8, 16), 0.040), ("fact-tk", (16, 32), 0.069)])
def test_vit_b16_counts_and_the_papers_averages(vit_b16, name, ranks, paper_mean):
    counts = {}
    for r in ranks:
        counts[r] = count_parameters(adapt(vit_b16, make_config(name, {"rank": r}), 100))["tuned_params_excluding_head"]
        assert counts[r] == _closed_form(name, r)
    # the paper's Table 1 (VTAB-1k) reports the mean over the 19 tasks: 0.040M (TT, r ≤ 16) and 0.069M (TK, r ≤ 32)
    mean = sum(counts[r] for r in OFFICIAL_RANKS[name]) / len(OFFICIAL_RANKS[name])
    assert round(mean / 1e6, 3) == paper_mean
    assert counts[8 if name == "fact-tt" else 32] == (21_504 if name == "fact-tt" else 86_528)  # the defaults


def _randomised(backbone, name, **sets):
    torch.manual_seed(0)
    model = adapt(backbone, make_config(name, {"dropout": 0.0, **sets}), 3)
    with torch.no_grad():
        for p in model.factors.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # V starts at zero: make every factor non-zero
    return model.eval()


def _increments_tt(f, r, s):
    """The official fact_tt.py: q = V(Σ_q(U x)) per chunk; fc1's Linear(r, 4r) output reshaped (4, r) → V each;
    fc2's input reshaped (4, D) → U each → (4r) → Linear(4r, r) → V."""
    u, v = f.u["32"].weight, f.v["32"].weight
    out = []
    for i in range(2):  # blocks: cores in order qkv, proj, fc1, fc2
        qkv, proj, fc1, fc2 = (f.cores[4 * i + j] for j in range(4))
        d_qkv = torch.cat([v @ qkv[c * r:(c + 1) * r] @ u for c in range(3)])
        d_fc1 = torch.cat([v @ fc1[c * r:(c + 1) * r] @ u for c in range(4)])
        d_fc2 = torch.cat([v @ fc2[:, c * r:(c + 1) * r] @ u for c in range(4)], dim=1)
        out.append({"qkv": s * d_qkv, "proj": s * (v @ proj @ u), "fc1": s * d_fc1, "fc2": s * d_fc2})
    return out


def _increments_tk(f, r, s, interleave=True):
    """The official fact_tk.py: FacTc = C @ P[:, idx:idx+4] for attention (q, k, v, proj: x_u @ slice j), and
    C @ P[:, idx:idx+8] for the MLP, whose slices 0-3 / 4-7 are reshaped (r, r, 4) → (r, 4r): fc1 = V((x_u @ M)
    in 4 chunks), fc2 = V(x_u of the 4 chunks, flattened, @ M2ᵀ)."""
    u, v = f.u["32"].weight, f.v["32"].weight
    out = []
    for i in range(2):
        attn = f.c @ f.p[:, 12 * i:12 * i + 4]
        mlp = f.c @ f.p[:, 12 * i + 4:12 * i + 12]
        if interleave:
            m1, m2 = mlp[:, :, :4].reshape(r, 4 * r), mlp[:, :, 4:].reshape(r, 4 * r)
        else:  # the negative control: one clean slice per d×d block
            m1 = torch.cat([mlp[:, :, j] for j in range(4)], dim=1)
            m2 = torch.cat([mlp[:, :, 4 + j] for j in range(4)], dim=1)
        d_qkv = torch.cat([v @ attn[:, :, j].t() @ u for j in range(3)])
        d_fc1 = torch.cat([v @ m1[:, c * r:(c + 1) * r].t() @ u for c in range(4)])
        d_fc2 = torch.cat([v @ m2[:, c * r:(c + 1) * r] @ u for c in range(4)], dim=1)
        out.append({"qkv": s * d_qkv, "proj": s * (v @ attn[:, :, 3].t() @ u), "fc1": s * d_fc1, "fc2": s * d_fc2})
    return out


def _reference_logits(model, increments):
    vit = model.backbone.model
    x = embed(vit, X)
    for block, delta in zip(vit.blocks, increments):
        stock = {n: (getattr(block.attn if n in ("qkv", "proj") else block.mlp, n).inner) for n in delta}
        x = block_math(block, x, {n: (stock[n].weight + delta[n], stock[n].bias) for n in delta})
    return model.head(cls_feature(vit, x))


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk"])
def test_forward_is_w_plus_s_times_the_official_increments(tiny_backbones, name):
    r, s = 4, 2.0
    model = _randomised(tiny_backbones("vit"), name, rank=r, scale=s)
    build = _increments_tt if name == "fact-tt" else _increments_tk
    with torch.no_grad():
        logits = model(X)
        assert (logits - _reference_logits(model, build(model.factors, r, s))).abs().max() < 1e-5
        # negative controls: without the scale s, or (TK) with one clean slice per block instead of the code's
        # interleaved MLP reshape, the reference is far off
        wrong = build(model.factors, r, 1.0) if name == "fact-tt" else _increments_tk(model.factors, r, s, False)
        assert (logits - _reference_logits(model, wrong)).abs().max() > 1e-2


def test_starts_at_the_frozen_model_and_the_weight_seen_by_readers_is_w_plus_delta(tiny_backbones):
    backbone = tiny_backbones("vit")
    model = adapt(backbone, make_config("fact-tt"), 3).eval()
    with torch.no_grad():
        assert torch.equal(model.features(X), backbone.forward_features(X))  # V = 0
    model = _randomised(backbone, "fact-tt")
    qkv = model.backbone.model.blocks[0].attn.qkv
    assert isinstance(qkv, FacTLinear) and isinstance(qkv, torch.nn.Linear)
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():  # F.linear on .weight (BEiT, EVA-02, Swin V2 attention) = calling the module
        assert (torch.nn.functional.linear(tokens, qkv.weight, qkv.bias) - qkv(tokens)).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["fact-tt", "fact-tk"])
def test_trains_only_the_factors_and_merges_into_stock_linears(tiny_backbones, name):
    model = _randomised(tiny_backbones("vit"), name, rank=4)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("factors.", "head.")) for n in trained)
    with torch.no_grad():
        merged = merge(model)
        assert (merged(X) - model(X)).abs().max() < 1e-5
    assert not any(isinstance(m, FacTLinear) for m in merged.modules())
