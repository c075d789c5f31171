"""E²VPT (Han et al., ICCV 2023): key-value prompts inside self-attention, visual prompts, and prompt pruning.

- **Key-value prompts**: every block's attention gets T extra keys and values, one learned tensor per block in the
  heads' key space (heads × T × head_dim, the same tensor used as keys and as values; prepended), which every token
  attends to. Init Kaiming-uniform (fan-in), dropout 0 (official ``SHARE_PARAM_KV=True``, ``LAYER_BEHIND=True``,
  ``ORIGIN_INIT=2``, ``QUERY_PROMPT_MODE=0``, ``DEEP=True``).
- **Visual prompts**: VPT-deep's P prompt tokens at every block, through the view's token seam (``forward_tokens``),
  VPT's uniform init, dropout 0.1 (``DEEP_P=True``, ``DROPOUT_P=0.1``). The official VTAB commands use P = 10 and
  T = 5 on most tasks (``command.txt``): the defaults here.
- **Pruning** (``prune_tokens``, ``prune_pieces``): each visual prompt token is multiplied by a token mask and each of
  its 16 pieces by a piece mask (piece k = the dimensions ≡ k mod 16, as the code tiles the piece mask with
  ``repeat``); masks are 1 at first. The official procedure trains the prompts, scores every mask by the training
  set's mean ∂L/∂mask, zeroes the lowest-scored tokens (at least one kept), then the lowest-scored pieces of every
  token (at least four kept), *rewinds* all prompts and the head to their initial values and trains again with the
  masks fixed; it repeats that for 9 × 9 pruning fractions and picks the best on val. vistune does one fraction
  pair in :meth:`E2VPT.prepare` (before the trainer's run): ``prune_epochs`` epochs of SGD (momentum 0.9,
  ``prune_lr``), the scores, the masks, the rewind; the trainer then trains from the rewound prompts. Pruned tokens
  stay in the sequence as zero vectors, as in the code. The code keeps its masks trainable before pruning; here they
  are fixed indicators. ``prune_score=code`` sorts the raw mean gradient ascending as the code does (which, to first
  order, removes the tokens whose removal raises the loss most); ``taylor`` prunes the other end.

The key-value attention is timm's ``Attention.forward`` written out with the extra keys and values (fused qkv,
``q_norm``/``k_norm``, optional gate and ``norm``, ``proj``); it wraps timm ViT attention only — EVA's rotary and
BEiT's relative-position attention are refused. Neither mergeable nor segmenting (it adds tokens).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import VistuneError
from .base import MethodConfig, ModuleTuner, TokenTuner, option, register

PIECES = 16  # official CLS_TOKEN_P_PIECES_NUM
MIN_TOKENS, MIN_PIECES = 1, 4  # official MIN_NUMBER_CLS_TOKEN, MIN_NUMBER_CLS_TOKEN_PIECE


@dataclass
class E2VPTConfig(MethodConfig):
    num_prompts: int = option(10, "P: visual prompt tokens per block (official VTAB commands: 10 on most tasks)")
    num_kv: int = option(5, "T: key-value prompts per block's attention (official VTAB commands: 5 on most tasks)")
    dropout: float = option(0.1, "dropout on the visual prompts (official DROPOUT_P)")
    kv_dropout: float = option(0.0, "dropout on the key-value prompts (official DROPOUT)")
    prune_tokens: float = option(0.0, "fraction of visual prompt tokens to prune before training (0: no pruning; "
                                      "the paper selects it on val from 0.1 … 0.9)")
    prune_pieces: float = option(0.0, "fraction of the 16 pieces of every kept token to prune (0: none)")
    prune_epochs: int = option(5, "epochs of the pre-pruning training (only when pruning)")
    prune_lr: float = option(0.5, "base lr (× batch/256) of the pre-pruning SGD (only when pruning)")
    prune_score: Literal["code", "taylor"] = option(
        "code", "code: prune the lowest mean ∂L/∂mask (the official sort); taylor: prune the highest")

    def validate(self):
        if self.num_prompts < 1 or self.num_kv < 1:
            raise VistuneError(f"e2vpt: num_prompts={self.num_prompts} and num_kv={self.num_kv} must be ≥ 1")
        for key in ("dropout", "kv_dropout", "prune_tokens", "prune_pieces"):
            if not 0 <= getattr(self, key) < 1:
                raise VistuneError(f"e2vpt: {key}={getattr(self, key)} must be in [0, 1)")
        if self.prune_epochs < 1 or self.prune_lr <= 0:
            raise VistuneError(f"e2vpt: prune_epochs={self.prune_epochs} must be ≥ 1 and prune_lr={self.prune_lr} > 0")


class KVPromptedAttention(nn.Module):
    """A stock timm ViT ``Attention`` whose every query also attends to T learned keys/values (heads × T × hd)."""

    def __init__(self, inner: Attention, num_kv: int, dropout: float):
        super().__init__()
        self.inner = inner
        w = inner.qkv.weight
        self.kv = nn.Parameter(torch.empty(inner.num_heads, num_kv, inner.head_dim, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.kv, a=0, mode="fan_in", nonlinearity="leaky_relu")  # official ORIGIN_INIT=2
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        a = self.inner
        b, n, _ = x.shape
        gate = a.gate(x).sigmoid() if a.gate is not None else None
        q, k, v = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        prompts = self.dropout(self.kv).unsqueeze(0).expand(b, -1, -1, -1)
        k, v = torch.cat([prompts, k], dim=2), torch.cat([prompts, v], dim=2)
        if attn_mask is not None:  # prompt columns: always visible
            attn_mask = F.pad(attn_mask, (prompts.shape[2], 0), value=True if attn_mask.dtype == torch.bool else 0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=a.attn_drop.p if self.training else 0.0)
        out = a.norm(out.transpose(1, 2).reshape(b, n, a.attn_dim))
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out))


@register("e2vpt", category="prompt", needs=("tokens",),
          description="E²VPT: key-value prompts in every attention plus VPT-deep visual prompts, with the paper's "
                      "token/piece pruning and rewinding")
class E2VPT(TokenTuner, ModuleTuner):
    Config = E2VPTConfig
    # base lr (× batch/256) of VPT's SGD recipe: VPT's 1.0 reached 0.69 of the best on the own ViT × clevr-count
    # (3 seeds), the grid point 0.5 0.89 on its digits; 0.7, between them, is ≥ 0.90 on all four tasks
    # (docs/defaults.md)
    default_lrs = {"sgd": 0.7}

    def attach(self):
        backbone, c = self.backbone, self.config
        blocks = backbone.blocks()
        odd = next((b for b in blocks if type(getattr(b, "attn", None)) is not Attention), None)
        if odd is not None:
            raise VistuneError(
                f"e2vpt: the attention of {backbone.spec.name!r} is {type(getattr(odd, 'attn', None)).__name__}; "
                "E²VPT's key-value prompts extend timm's ViT Attention (EVA's rotary and BEiT's relative-position "
                "attention are not supported)", "use vpt-deep on this backbone")
        d = backbone.embed_dim
        if d % PIECES:
            raise VistuneError(f"e2vpt: the width {d} of {backbone.spec.name!r} is not a multiple of the {PIECES} "
                               "prompt pieces the pruning masks", "use vpt-deep on this backbone")
        for block in blocks:
            block.attn = KVPromptedAttention(block.attn, c.num_kv, c.kv_dropout)
        self.prompts = nn.Parameter(torch.empty(len(blocks), c.num_prompts, d))
        bound = math.sqrt(6.0 / float(3 * math.prod(backbone.patch_size) + d))  # VPT's init, as the official code
        nn.init.uniform_(self.prompts, -bound, bound)
        self.prompt_dropout = nn.Dropout(c.dropout)
        self.register_buffer("token_mask", torch.ones(c.num_prompts))
        self.register_buffer("piece_mask", torch.ones(c.num_prompts, PIECES))

    def masks(self) -> torch.Tensor:
        """(P, D): token mask × piece mask, piece k covering the dimensions ≡ k (mod 16) (the code's ``repeat``)."""
        return self.token_mask[:, None] * self.piece_mask.repeat(1, self.backbone.embed_dim // PIECES)

    def prompt_tokens(self, i: int, batch: int, masks: torch.Tensor) -> torch.Tensor:
        return self.prompt_dropout(self.prompts[i].unsqueeze(0).expand(batch, -1, -1)) * masks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        batch, masks = x.shape[0], self.masks()
        return self.backbone.forward_tokens(x, self.prompt_tokens(0, batch, masks),
                                            lambda i: self.prompt_tokens(i, batch, masks))

    # ---- pruning and rewinding ---------------------------------------------------------------
    def prepare(self, train_set, *, device: torch.device, batch_size: int, progress: bool) -> None:
        """The official pruning with rewinding, for one pair of fractions (see the module docstring)."""
        c = self.config
        if c.prune_tokens == 0 and c.prune_pieces == 0:
            return
        rewind = copy.deepcopy({k: v.detach() for k, v in self.tuned_state_dict().items()})
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        trained = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trained, lr=c.prune_lr * batch_size / 256, momentum=0.9)
        self.train()
        for _ in tqdm(range(c.prune_epochs), desc="e2vpt pre-pruning", disable=not progress):
            for x, y in loader:
                loss = F.cross_entropy(self(x.to(device)), y.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        token_score, piece_score = self._mask_scores(loader, device)
        sign = 1.0 if c.prune_score == "code" else -1.0
        self._prune(sign * token_score, sign * piece_score)
        masks = {"token_mask": self.token_mask.clone(), "piece_mask": self.piece_mask.clone()}
        self.load_state_dict({**rewind, **masks}, strict=False)  # rewind every tuned tensor, keep the masks

    def _mask_scores(self, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The training set's mean ∂L/∂mask of every token mask and piece mask (masks at 1, prompts trained)."""
        masks = [self.token_mask, self.piece_mask]
        totals = [torch.zeros_like(m) for m in masks]
        self.eval()  # as the code: scores in eval mode
        for m in masks:
            m.requires_grad_(True)
        try:
            for x, y in loader:
                loss = F.cross_entropy(self(x.to(device)), y.to(device))
                for total, grad in zip(totals, torch.autograd.grad(loss, masks)):
                    total += grad
        finally:
            for m in masks:
                m.requires_grad_(False)
        return totals[0] / len(loader), totals[1] / len(loader)

    def _prune(self, token_score: torch.Tensor, piece_score: torch.Tensor) -> None:
        """Zero the masks of the lowest-scored tokens, then of the lowest-scored pieces of every token."""
        c, p = self.config, self.config.num_prompts
        n_tokens = min(int(p * c.prune_tokens), p - MIN_TOKENS)
        n_pieces = min(int(PIECES * c.prune_pieces), PIECES - MIN_PIECES)
        with torch.no_grad():
            self.token_mask[torch.argsort(token_score)[:n_tokens]] = 0
            lowest = torch.argsort(piece_score, dim=1)[:, :n_pieces]
            self.piece_mask.scatter_(1, lowest, 0.0)
