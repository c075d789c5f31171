"""The family view: one small interface over a stock timm model.

Methods reach the backbone only through this interface (token tuners) or by wrapping its
modules (module tuners); no timm model file is ever forked.
"""
from __future__ import annotations

import abc
import copy
import hashlib
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class BackboneSpec:
    """Where a backbone came from; recorded in every artifact so it can be rebuilt exactly."""

    name: str  # the name the user gave: a timm architecture or an offline/packaged name
    architecture: str  # the timm architecture that is instantiated
    source: str  # "hub", "file", "random-init", "package:<dist>", "vistune:<file>"
    checkpoint: str | None = None  # local weights file, when source == "file"
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (tests)

    def to_dict(self) -> dict:
        return asdict(self)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted, as in ``named_modules``) of ``root`` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)


class BackboneView(nn.Module, abc.ABC):
    """A frozen timm model seen through the interface every method uses.

    Subclasses (one per family) set ``family`` and implement ``blocks``/``final_modules``.
    """

    family: str = ""

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self._fingerprint: str | None = None
        self._num_params = sum(p.numel() for p in model.parameters())
        # identities of the stock model's modules, and of those whose tensors a method tunes: a
        # tensor is frozen iff a stock module owns it and it is not tuned (module identity, unlike
        # a buffer tensor's, survives .to(device); modules a method wraps in are never stock)
        self.stock_module_ids: frozenset[int] = frozenset(id(m) for m in model.modules())
        self.tuned_module_ids: frozenset[int] = frozenset()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    # ---- the interface -------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature the head reads."""
        return getattr(self.model, "head_hidden_size", None) or self.model.num_features

    @abc.abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The residual blocks in forward order (flattened across stages)."""

    @abc.abstractmethod
    def final_modules(self) -> dict[str, nn.Module]:
        """Modules after the last block and before the head (final norms, CNN head conv)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch → pooled pre-logit feature (B, feature_dim)."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    # ---- bookkeeping ----------------------------------------------------------------------
    def train(self, mode: bool = True):
        # The frozen backbone always runs in eval mode (dropout, drop-path, BN statistics off);
        # methods that train parts of it switch those parts on themselves.
        return super().train(False)

    def module_names(self, modules) -> list[str]:
        by_id = {id(m): n for n, m in self.model.named_modules()}
        return [by_id[id(m)] for m in modules]

    def num_params(self) -> int:
        """Parameters of the stock backbone (not counting modules a method wraps into it)."""
        return self._num_params

    def fingerprint(self) -> str:
        """sha256 over parameter and buffer names and bytes of the untouched backbone."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in self.model.state_dict().items():
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(name.encode())
                h.update(str(t.dtype).encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def clone_for_tuning(self, tuned: set[str]) -> "BackboneView":
        """A new view whose module tree is a copy, sharing every frozen tensor with this one.

        Parameters named in ``tuned`` (and buffers of modules that own a tuned parameter) are
        cloned and made trainable, so training never touches this view's tensors: the original
        backbone stays bit-identical while memory for frozen weights is not duplicated.
        """
        fingerprint = self.fingerprint()
        unknown = tuned - {n for n, _ in self.model.named_parameters()}
        if unknown:
            raise KeyError(f"not backbone parameters: {sorted(unknown)[:5]}")
        tuned_modules = {n.rpartition(".")[0] for n in tuned}
        memo: dict[int, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if name not in tuned:
                # a new Parameter object over the same storage: no copy, yet .to(device) on the clone
                # (which swaps a Parameter's .data in place) can never move this view's weights
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        for name, b in self.model.named_buffers():
            if name.rpartition(".")[0] not in tuned_modules:
                memo[id(b)] = b
        model = copy.deepcopy(self.model, memo)
        view = type(self).__new__(type(self))
        nn.Module.__init__(view)
        view.model = model
        view.spec = self.spec
        view._fingerprint = fingerprint
        view._num_params = self._num_params
        view.stock_module_ids = frozenset(id(m) for m in model.modules())
        view.tuned_module_ids = frozenset(id(m) for n, m in model.named_modules() if n in tuned_modules)
        for name, p in model.named_parameters():
            p.requires_grad_(name in tuned)
        model.eval()
        return view
