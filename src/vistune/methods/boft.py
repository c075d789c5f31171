"""BOFT (Liu et al., ICLR 2024) through HF peft: OFT whose orthogonal matrix is a product of m butterfly factors.

R = B_m ⋯ B_1, each butterfly factor a permuted block-diagonal orthogonal matrix (blocks of size b, Cayley of a
learned skew-symmetric matrix), so m factors of small blocks mix the whole input space, as the Cooley–Tukey FFT
does, with far fewer parameters than one dense orthogonal matrix; a learned scale s per output row follows. Every
factor starts at I and s at 1 (step 0 = the frozen model). peft's BOFT (contributed by the paper's authors) needs
b·2^(m−1) to divide the layer's input size: targets that do not are refused. Linear only, as OFT (peft's BOFT conv
layers build in·k·k-square permutation matrices per layer: 26 s to attach to a tiny ConvNeXt here).

peft 0.21 computes m ≥ 2 factors only with its CUDA extension (``fbd_cuda``, compiled at first use with ninja and
nvcc); where that extension cannot load it silently trains one factor instead, which would change the method and
the artifact's tensor shapes from machine to machine. vistune therefore defaults to m = 1 (runs everywhere: one
block-diagonal rotation with blocks of b plus the scale s), refuses m ≥ 2 where the extension is unavailable, and
does not make peft try to compile it on a machine without CUDA. Targets: W_q, W_v on the transformer views (as
vistune's LoRA), every Linear on the generic view. Mergeable: R and s fold into W.
"""
from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch

from ..errors import VistuneError
from .base import option, register
from .peft_common import ADAPTER_NAME, PeftMethod, PeftMethodConfig, exact_names, require_peft


@dataclass
class BOFTConfig(PeftMethodConfig):
    block_size: int = option(4, "b: size of each butterfly block (peft's default 4); b·2^(m−1) must divide every "
                                "target's input size")
    butterfly_factors: int = option(1, "m: number of butterfly factors (1: one block-diagonal rotation, runs "
                                       "everywhere; ≥ 2 needs peft's CUDA extension)")
    dropout: float = option(0.0, "multiplicative dropout on the butterfly blocks")

    def validate(self):
        if self.block_size < 2 or self.block_size % 2:
            raise VistuneError(f"boft: block_size={self.block_size} must be even and ≥ 2", "use e.g. --set block_size=4")
        if self.butterfly_factors < 1:
            raise VistuneError(f"boft: butterfly_factors={self.butterfly_factors} must be ≥ 1")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"boft: dropout={self.dropout} must be in [0, 1)")


@register("boft", category="parameter",
          description="BOFT (peft): orthogonal butterfly rotation of the weights' input space (W_q, W_v; generic view: "
                      "every Linear); mergeable")
class BOFT(PeftMethod):
    Config = BOFTConfig
    default_targets = {"transformer": "qv", "generic": "linear"}
    linear_only = True

    def select_targets(self, backbone, config):
        targets = super().select_targets(backbone, config)
        span = config.block_size * 2 ** (config.butterfly_factors - 1)
        misfits = {}
        for name in targets:
            m = backbone.model.get_submodule(name)
            size = m.in_features if hasattr(m, "in_features") else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            if size % span:
                misfits[name] = size
        if misfits:
            name, size = next(iter(misfits.items()))
            raise VistuneError(
                f"boft: block_size·2^(butterfly_factors−1) = {span} does not divide the input size of {len(misfits)} "
                f"target(s) of {backbone.spec.name!r} (e.g. {name}: {size})",
                "choose block_size and butterfly_factors whose product divides every target's input size "
                "(e.g. --set butterfly_factors=1), or other targets")
        return targets

    def attach(self):
        import peft.tuners.boft.layer as boft_layer

        m = self.config.butterfly_factors
        if not torch.cuda.is_available():
            if m > 1:
                raise self._no_extension(m)
            # the extension cannot exist without CUDA: spare the compile attempt peft makes for every layer
            with mock.patch.object(boft_layer, "get_fbd_cuda", return_value=None):
                super().attach()
            return
        super().attach()
        if any(layer.boft_R[ADAPTER_NAME].shape[0] != m for layer in self.modules()
               if isinstance(layer, boft_layer.BOFTLayer)):
            raise self._no_extension(m)

    @staticmethod
    def _no_extension(m: int) -> VistuneError:
        return VistuneError(
            f"boft: butterfly_factors={m} needs peft's BOFT CUDA extension (fbd_cuda), which cannot be loaded here "
            "(it needs a CUDA GPU, nvcc and ninja); peft would silently train 1 factor instead",
            "use --set butterfly_factors=1 (the default), or train on a CUDA machine where the extension builds")

    def peft_config(self, targets):
        c = self.config
        return require_peft().BOFTConfig(
            boft_block_size=c.block_size, boft_block_num=0, boft_n_butterfly_factor=c.butterfly_factors,
            target_modules=exact_names(targets), boft_dropout=c.dropout, bias="none",
        )
