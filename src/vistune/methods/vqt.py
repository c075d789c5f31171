"""Visual Query Tuning (Tu et al., CVPR 2023): learned queries that summarise every layer, no backward through it.

Each block i gets T learnable query tokens. They go through block i like tokens of its sequence — ``norm1``, the
block's own q projection, attention, ``proj``, layer scale, the MLP — but they attend only to the block's input
tokens (keys and values of CLS, registers and patches), not to themselves, and no token attends to them: the frozen
trunk computes exactly its stock forward. The head reads the concatenation of the L2-normalised pooled feature and
the L2-normalised, flattened query outputs of every block, D + L·T·D wide (official code: andytu28/VQT,
``h2t_vit.py``: keys/values from ``hidden_states[:, T:]``, ``NORMALIZE_FEATS=True``, concatenation, T = 1 in its
scripts, query dropout 0.1, VPT's uniform init).

The point of VQT is memory: nothing before the head depends on a trained parameter except the query rows, so the
trunk runs under ``torch.no_grad`` and backward only visits the T query rows of each block. (The official code
concatenates queries and tokens into one sequence, so autograd keeps the trunk's activations anyway.) The query rows
reuse the block's stock modules; the attention of T queries over the tokens' keys and values is written out as
timm's ``Attention.forward`` computes it (fused qkv, ``q_norm``/``k_norm``, optional gate and ``norm``, ``proj``),
with the tokens' keys and values read off the stock forward by a hook on ``attn.qkv``. It runs on timm ViT blocks
(``vision_transformer.Block`` with ``Attention``); EVA (RoPE) and BEiT (relative position bias) blocks are refused.
Not mergeable (the head reads the queries) and no segmentation.

OSU-MLB/PETL_Vision's VQT differs: it combines the outputs with a learned weighted sum into one D-wide feature, and
its ``vision_transformer.py`` drops the queries before collecting them (``x = x[:, vqt_num:]`` first), so what it
collects are CLS and patch tokens; vistune follows the official repository.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from ..errors import VistuneError
from .base import MethodConfig, TokenTuner, option, register


@dataclass
class VQTConfig(MethodConfig):
    num_queries: int = option(1, "T: query tokens per block (official scripts: 1)")
    dropout: float = option(0.1, "dropout on the query tokens (official: 0.1)")
    normalize: bool = option(True, "L2-normalise the pooled feature and each block's query outputs before the head "
                                   "(official NORMALIZE_FEATS)")

    def validate(self):
        if self.num_queries < 1:
            raise VistuneError(f"vqt: num_queries={self.num_queries} must be ≥ 1", "use --set num_queries=1")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"vqt: dropout={self.dropout} must be in [0, 1)")


def query_block(block: Block, queries: torch.Tensor, token_qkv: torch.Tensor) -> torch.Tensor:
    """Block ``block`` applied to ``queries`` (B, T, D) whose attention reads only the keys and values of the
    block's tokens (``token_qkv``: the stock ``attn.qkv`` output of its input, (B, N, 3·A)); timm's order."""
    attn = block.attn
    b, t, _ = queries.shape
    heads, hd = attn.num_heads, attn.head_dim
    h = block.norm1(queries)
    q = F.linear(h, attn.qkv.weight[:attn.attn_dim],
                 None if attn.qkv.bias is None else attn.qkv.bias[:attn.attn_dim])
    q = attn.q_norm(q.reshape(b, t, heads, hd).transpose(1, 2))
    _, k, v = token_qkv.reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, attn.k_norm(k), v,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(b, t, attn.attn_dim))
    if attn.gate is not None:
        out = out * attn.gate(h).sigmoid()
    x = queries + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@register("vqt", category="prompt", needs=("tokens",),
          description="VQT: per-block query tokens that read each block's tokens (not read by them); the head sees "
                      "all query outputs; no backward through the trunk")
class VQT(TokenTuner):
    Config = VQTConfig
    # SGD momentum 0.9 as VPT's recipe (the official code builds on VPT's). Measured (docs/defaults.md): VPT's base
    # lr 1.0 reached 0.79 of the grid's best (10) in a 4-epoch run on fashion-mnist; 2.5, the lowest grid lr that
    # reached ≥ 90 % there, then reached 0.82 on mnist5k; 5 ≥ 0.92 on the own ViT's three tasks measured
    default_lrs = {"sgd": 5.0}

    def attach(self):
        backbone, c = self.backbone, self.config
        blocks = backbone.blocks()
        odd = next((b for b in blocks if type(b) is not Block or type(b.attn) is not Attention), None)
        if odd is not None:
            raise VistuneError(
                f"vqt: the blocks of {backbone.spec.name!r} are {type(odd).__name__} with {type(odd.attn).__name__}; "
                "VQT's queries run through timm's ViT Block and Attention (EVA's rotary and BEiT's relative-position "
                "attention are not supported)", "use vpt-deep, lora or ssf on this backbone")
        d = backbone.embed_dim
        self.queries = nn.Parameter(torch.empty(len(blocks), c.num_queries, d))
        bound = math.sqrt(6.0 / float(3 * math.prod(backbone.patch_size) + d))  # VPT's init, as the official code
        nn.init.uniform_(self.queries, -bound, bound)
        self.query_dropout = nn.Dropout(c.dropout)

    def build_head(self) -> nn.Module:
        blocks = len(self.backbone.blocks())
        return self.make_linear_head(self.backbone.embed_dim * (1 + blocks * self.config.num_queries))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        view = self.backbone
        batch = x.shape[0]
        outputs = []
        with torch.no_grad():
            tokens = view.embed(x)
        for block, queries in zip(view.model.blocks, self.queries):
            captured = []  # the stock qkv output of the block's tokens: their keys and values
            hook = block.attn.qkv.register_forward_hook(lambda module, args, out: captured.append(out))
            try:
                with torch.no_grad():
                    tokens_out = block(tokens)
            finally:
                hook.remove()
            queries = self.query_dropout(queries.unsqueeze(0).expand(batch, -1, -1))
            outputs.append(query_block(block, queries, captured[0]).flatten(1))
            tokens = tokens_out
        with torch.no_grad():
            pooled = view.head_features(tokens)
        parts = [pooled, *outputs]
        if self.config.normalize:
            parts = [F.normalize(p, dim=-1) for p in parts]
        return torch.cat(parts, dim=-1)
