"""FourierFT (Gao et al., ICML 2024) through HF peft: ΔW = α · Re(IDFT2(S)), S sparse with n learned coefficients.

Each targeted Linear learns n spectral coefficients at n frequency locations drawn once at random
(``location_seed``; the same locations for every layer); ΔW is the real part of the 2-D inverse DFT of that sparse
spectrum, times the scaling α. The paper's image-classification setting (ViT-B, W_q and W_v, n = 3000, α = 300 —
peft's documented ViT values) gives 12·2·3000 = 72,000 parameters (its Table 4: 72K). The coefficients start
N(0, 1) as in the paper (``init=zeros`` starts at the frozen model instead). peft's FourierFT layers are Linear-only:
the generic view's target is every Linear (a CNN without Linears is refused). Mergeable: ΔW is dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import VistuneError
from .base import option, register
from .peft_common import PeftMethod, PeftMethodConfig, exact_names, require_peft


@dataclass
class FourierFTConfig(PeftMethodConfig):
    n_frequency: int = option(3000, "learned spectral coefficients per layer (paper on ViT: 3000 or 10000); "
                                    "capped at in×out of the smallest targeted layer")
    scaling: float = option(300.0, "α: ΔW = α·Re(IDFT2(S)) (peft's documented value for ViT-B/L: 300)")
    location_seed: int = option(777, "seed of the random frequency locations (peft's default 777)")
    init: Literal["normal", "zeros"] = option(
        "normal", "normal: coefficients N(0, 1) as the paper (step 0 ≠ frozen model); zeros: start at the frozen model")

    def validate(self):
        if self.n_frequency < 1:
            raise VistuneError(f"fourierft: n_frequency={self.n_frequency} must be ≥ 1", "use e.g. --set n_frequency=3000")
        if self.scaling <= 0:
            raise VistuneError(f"fourierft: scaling={self.scaling} must be > 0")


@register("fourierft", category="parameter",
          description="FourierFT (peft): n learned spectral coefficients per weight, ΔW = α·IDFT (W_q, W_v; generic "
                      "view: every Linear); mergeable")
class FourierFT(PeftMethod):
    Config = FourierFTConfig
    default_targets = {"transformer": "qv", "generic": "linear"}
    linear_only = True

    def peft_config(self, targets):
        c = self.config
        sizes = [self.backbone.model.get_submodule(n).weight.numel() for n in targets]
        return require_peft().FourierFTConfig(
            n_frequency=min(c.n_frequency, *sizes), scaling=c.scaling, random_loc_seed=c.location_seed,
            target_modules=exact_names(targets), init_weights=c.init == "zeros", bias="none",
        )
