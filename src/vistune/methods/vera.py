"""VeRA (Kopiczko et al., ICLR 2024) through HF peft: one pair of frozen random matrices shared by every layer.

ΔW = Λ_b B Λ_d A: A (r×in) and B (out×r) are frozen random (Kaiming-uniform, drawn once from ``projection_seed``
and shared across all targeted layers, sized to the largest of them); only the per-layer scaling vectors
d (r, init ``d_initial``) and b (out, init 0) train, so step 0 is the frozen model. The paper adapts W_q and W_v of
ViT-B with r = 256 (Table 4: 24.6K parameters); peft's VeRA layers are Linear-only, so on the generic view the
targets are every Linear (a CNN without Linears is refused). Mergeable: ΔW is one dense matrix per layer.

peft's ``inject_adapter_in_model`` refuses VeRA (its A and B live on peft's tuner object), so vistune builds peft's
``VeraModel`` over its copy of the backbone, which injects the layers in place. Every VeRA layer references the one
pair A, B; they are not saved (peft's ``save_projection=False``): a reload redraws them from ``projection_seed`` with
peft's CPU generator, bit for bit, instead of storing one copy per layer.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import VistuneError
from .base import option, register
from .peft_common import ADAPTER_NAME, PeftMethod, PeftMethodConfig, exact_names, expose_base_attributes, require_peft


@dataclass
class VeRAConfig(PeftMethodConfig):
    r: int = option(256, "rank of the shared random matrices A (r×in) and B (out×r) (paper: 256 on ViT)")
    d_initial: float = option(0.1, "initial value of the trained vector d (paper Table 6c: ≤ 0.1)")
    dropout: float = option(0.0, "dropout on the VeRA branch input")
    projection_seed: int = option(0, "seed of the frozen random A and B (saved in the artifact as well)")

    def validate(self):
        if self.r < 1:
            raise VistuneError(f"vera: r={self.r} must be ≥ 1", "use e.g. --set r=256")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"vera: dropout={self.dropout} must be in [0, 1)")


@register("vera", category="parameter",
          description="VeRA (peft): shared frozen random low-rank matrices, trained per-layer scaling vectors "
                      "(W_q, W_v; generic view: every Linear); mergeable")
class VeRA(PeftMethod):
    Config = VeRAConfig
    default_targets = {"transformer": "qv", "generic": "linear"}
    linear_only = True

    def attach(self):
        self.targets = self.select_targets(self.backbone, self.config)
        peft = require_peft()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
            peft.VeraModel(self.backbone.model, self.peft_config(self.targets), ADAPTER_NAME)  # injects in place
        expose_base_attributes(self.backbone.model)

    def peft_config(self, targets):
        c = self.config
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
            return require_peft().VeraConfig(
                r=c.r, target_modules=exact_names(targets), projection_prng_key=c.projection_seed,
                save_projection=False, vera_dropout=c.dropout, d_initial=c.d_initial, bias="none",
            )
