"""peft's VeRA, OFT, BOFT and FourierFT as vistune presets: on W_q and W_v of the split qkv, the adapted forward is
the papers' weight update written out by hand (reading only the tensors peft holds), and BOFT's CPU behaviour."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import IMAGE_SIZE
from vistune.errors import VistuneError
from vistune.methods import adapt, make_config
from vit_math import block_math, cls_feature, embed

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
D = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _vera(layer, w):
    """VeRA: W + Λ_b B Λ_d A, the shared A (r × in) and B (out × r) sliced to the layer."""
    a, b = layer.vera_A["default"][:, :w.shape[1]], layer.vera_B["default"][:w.shape[0]]
    return w + torch.diag(layer.vera_lambda_b["default"]) @ b @ torch.diag(layer.vera_lambda_d["default"]) @ a


def _fourierft(layer, w):
    """FourierFT: W + α·Re(IDFT2(S)), S zero but for the n learned coefficients: (α / mn) Σ c cos(2π(u·i/m + v·j/n))."""
    m, n = w.shape
    (u, v), c = layer.indices["default"], layer.fourierft_spectrum["default"]
    i, j = torch.arange(m)[:, None, None], torch.arange(n)[None, :, None]
    waves = torch.cos(2 * math.pi * (u * i / m + v * j / n))
    return w + layer.fourierft_scaling["default"] / (m * n) * (waves * c).sum(-1)


def _skew(vec, size):
    q = torch.zeros(vec.shape[0], size, size)
    rows, cols = torch.triu_indices(size, size, 1)
    q[:, rows, cols] = vec
    return q - q.transpose(1, 2)


def _cayley(q):
    eye = torch.eye(q.shape[-1])
    return (eye - q) @ torch.linalg.inv(eye + q)


def _oft(layer, w):
    """OFT: y = W (x R) = (W Rᵀ) x, R block-diagonal of Cayley blocks (I − Q)(I + Q)⁻¹."""
    rot = layer.oft_R["default"]
    r = torch.block_diag(*_cayley(_skew(rot.weight, rot.block_size)))
    assert torch.allclose(r @ r.t(), torch.eye(w.shape[1]), atol=1e-5)  # orthogonal
    return w @ r.t()


def _boft(layer, w):
    """BOFT with one butterfly factor: y = s ⊙ (W Rᵀ x), R block-diagonal Cayley blocks of the skew part."""
    blocks = layer.boft_R["default"][0]
    r = torch.block_diag(*_cayley(0.5 * (blocks - blocks.transpose(1, 2))))
    return layer.boft_s["default"] * (w @ r.t())


@pytest.mark.parametrize("name,update,sets", [("vera", _vera, {"r": 16}), ("fourierft", _fourierft, {"n_frequency": 50}),
                                              ("oft", _oft, {"block_size": 8}), ("boft", _boft, {})])
def test_forward_is_the_papers_update_of_w_q_and_w_v(tiny_backbones, name, update, sets):
    torch.manual_seed(0)
    model = adapt(tiny_backbones("vit"), make_config(name, sets), 3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    vit = model.backbone.model

    def reference(change):
        x = embed(vit, X)
        for block in vit.blocks:
            split = block.attn.qkv  # SplitQKV: the stock fused Linear and its q, k, v slices
            w, b = split.fused.weight, split.fused.bias
            rows = [change(split.q, w[:D]), w[D:2 * D], change(split.v, w[2 * D:])]
            x = block_math(type("Block", (), {"attn": block.attn, "mlp": block.mlp, "norm1": block.norm1,
                                              "norm2": block.norm2}), x, {"qkv": (torch.cat(rows), b)})
        return model.head(cls_feature(vit, x))

    with torch.no_grad():
        logits = model(X)
        assert (logits - reference(update)).abs().max() < 1e-5
        assert (logits - reference(lambda layer, w: w)).abs().max() > 1e-3  # negative control: no update


def test_boft_scales_before_the_bias_and_refuses_factors_it_cannot_compute(tiny_backbones):
    torch.manual_seed(0)
    model = adapt(tiny_backbones("vit"), make_config("boft"), 3)
    layer = model.backbone.model.blocks[0].attn.qkv.q
    with torch.no_grad():
        layer.boft_s["default"].mul_(2.0)
        x = torch.randn(3, D)
        assert torch.allclose(layer(x), 2.0 * (x @ layer.base_layer.weight.t()) + layer.base_layer.bias, atol=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(VistuneError, match="needs peft's BOFT CUDA extension"):
            adapt(tiny_backbones("vit"), make_config("boft", {"butterfly_factors": 2}), 3)
