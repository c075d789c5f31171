"""OFT (Qiu et al., NeurIPS 2023) through HF peft: W' = W R, R block-diagonal orthogonal (Cayley of skew blocks).

Each targeted layer's input space is rotated by a block-diagonal orthogonal matrix: in/b blocks of size b, each
the Cayley transform (I − Q)(I + Q)⁻¹ of a learned skew-symmetric Q (b(b−1)/2 parameters per block). Q starts at 0
(R = I), so step 0 is the frozen model; the rotation keeps the pairwise angles of the frozen neurons. peft shrinks b
to a divisor of the input size where b does not divide it. Targets: W_q, W_v on the transformer views (as vistune's
LoRA; the OFT paper tunes diffusion models), every Linear on the generic view. Mergeable: R folds into W. Linear
only: peft 0.21.2's OFT Conv2d layers merge into a different function than their forward (measured: logits off by
3.1 on a tiny ConvNeXt), so conv targets are refused.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from ..errors import VistuneError
from .base import option, register
from .peft_common import PeftMethod, PeftMethodConfig, exact_names, require_peft


@dataclass
class OFTConfig(PeftMethodConfig):
    block_size: int = option(32, "b: size of each orthogonal block (peft's default 32; shrunk to a divisor of the "
                                 "input size where needed)")
    coft: bool = option(False, "constrained OFT: keep R within eps of I (the paper's COFT)")
    eps: float = option(6e-5, "COFT's radius around I (only with coft)")
    dropout: float = option(0.0, "multiplicative dropout: each block's rotation replaced by I with this probability")
    cayley: Literal["exact", "neumann"] = option(
        "exact", "exact: R = (I − Q)(I + Q)⁻¹, the paper's Cayley transform; neumann: peft's default 5-term Neumann "
                 "series (faster, orthogonal only approximately)")

    def validate(self):
        if self.block_size < 2:
            raise VistuneError(f"oft: block_size={self.block_size} must be ≥ 2", "use e.g. --set block_size=32")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"oft: dropout={self.dropout} must be in [0, 1)")


@register("oft", category="parameter",
          description="OFT (peft): block-diagonal orthogonal rotation of the weights' input space (W_q, W_v; generic "
                      "view: every Linear); mergeable")
class OFT(PeftMethod):
    Config = OFTConfig
    default_targets = {"transformer": "qv", "generic": "linear"}
    linear_only = True
    flat_inputs_only = True  # peft 0.21.2's OFT unfolds a Linear's 4-D input as if it were a conv's (shape error)
    # base lr (× batch/256; SGD, vistune's peft recipe): the recipe's 1.0 stayed at chance on the own ViT × digits
    # (val 0.115, the loss rising); 0.5 reached ≥ 0.99 of the best there and on fashion-mnist (docs/defaults.md)
    default_lrs = {"sgd": 0.5}

    def attach(self):
        with warnings.catch_warnings():  # peft shrinking the block size to a divisor of the layer's input size
            warnings.filterwarnings("ignore", message="Invalid `oft_block_size`")
            super().attach()

    def peft_config(self, targets):
        c = self.config
        return require_peft().OFTConfig(
            r=0, oft_block_size=c.block_size, target_modules=exact_names(targets), coft=c.coft, eps=c.eps,
            module_dropout=c.dropout, use_cayley_neumann=c.cayley == "neumann", bias="none",
        )
