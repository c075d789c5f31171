"""A timm ViT's forward written out by hand from its parameters, for the methods' reference-forward tests.

Nothing here calls a timm or vistune module's ``forward``: patch embedding, LayerNorm, multi-head attention,
GELU MLP and the CLS head are explicit tensor math on the stock parameters (the tiny ViT of conftest: CLS token,
no registers, pre-norm blocks, no layer scale), so a method's implementation can be checked against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def embed(vit, x):
    """[CLS, patches] + positions."""
    pe = vit.patch_embed.proj
    p = pe.weight.shape[-1]
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)
    tokens = patches @ pe.weight.reshape(pe.weight.shape[0], -1).t() + pe.bias
    cls = vit.cls_token.expand(b, -1, -1)
    return torch.cat([cls, tokens], dim=1) + vit.pos_embed


def heads(x, n):
    b, t, d = x.shape
    return x.reshape(b, t, n, d // n).transpose(1, 2)


def attend(q, k, v):
    """softmax(q kᵀ / √d) v per head; q (B, H, Tq, d), k and v (B, H, Tk, d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def stock_weights(block, skip=()):
    """The block's four weight matrices and biases: name → (W, b), but for the names in ``skip`` (their module
    may be wrapped by the method, e.g. peft's split qkv, and hold no weight of its own)."""
    a, m = block.attn, block.mlp
    modules = {"qkv": a.qkv, "proj": a.proj, "fc1": m.fc1, "fc2": m.fc2}
    return {name: (mod.weight, mod.bias) for name, mod in modules.items() if name not in skip}


def block_math(block, x, weights=None, gamma=(1.0, 1.0), kv=None):
    """One pre-norm block: x + γ₁·proj(attn(LN₁ x)), then + γ₂·fc2(GELU(fc1(LN₂ x))).

    ``weights``: name → (W, b) replacing the stock ones; ``kv``: (H, T, d) extra keys = values, prepended."""
    weights = weights or {}
    w = {**stock_weights(block, skip=weights), **weights}
    n = block.attn.num_heads
    h = layer_norm(x, block.norm1)
    qkv = h @ w["qkv"][0].t() + w["qkv"][1]
    q, k, v = (heads(t, n) for t in qkv.chunk(3, dim=-1))
    if kv is not None:
        extra = kv.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        k, v = torch.cat([extra, k], dim=2), torch.cat([extra, v], dim=2)
    a = merge_heads(attend(q, k, v)) @ w["proj"][0].t() + w["proj"][1]
    x = x + gamma[0] * a
    hidden = F.gelu(layer_norm(x, block.norm2) @ w["fc1"][0].t() + w["fc1"][1])
    return x + gamma[1] * (hidden @ w["fc2"][0].t() + w["fc2"][1])


def cls_feature(vit, tokens):
    return layer_norm(tokens, vit.norm)[:, 0]
