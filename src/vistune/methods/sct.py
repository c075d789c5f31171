"""Salient Channel Tuning (SCT; Zhao et al., IJCV 2023): tune only a few task-salient channels.

**Calibration** (:func:`calibrate`, run by :meth:`SCT.prepare` once before training): the frozen
backbone, in eval mode and under ``torch.no_grad``, sees the un-augmented training set once. At
every layer the residual stream at the placement's calibration point is read (norm2's input for
``attn``, the block's output for ``mlp-branch`` and ``mlp``; below); for each class c the L2 norm of
every channel over all samples of c and all tokens (prefix tokens such as CLS dropped) gives a
D-vector; these are averaged over the classes present in the data (the class-aware score), and
the K highest-scoring channels are that layer's salient channels. Only per-class sums of squares
are accumulated, never the activations themselves. The indices AND their scores are registered
buffers of the model, so an artifact stores them and loading restores them.

**Module** (one per layer, own indices): ``x[..., idx] += Linear(K, K)(x[..., idx])``, weight
trunc-normal(std 0.02), bias 0; done out of place (``index_select`` + ``index_add``), so autograd
is never handed an in-place write and nothing is tied to a device. Only these and the head train.

Placement, ViT and Swin (official code: showlab/SCT ``models/vision_transformer_sct.py``, ``Block.forward``
and ``train_model_sct.py`` ``getSalientChannels``):

- ``attn`` (the paper's and the official default, ``sct_attn``): x ← SCT(x + attn(norm1(x))), i.e. on the
  input of ``norm2``; calibrated there (the official hook: ``norm2``'s input).
- ``mlp-branch`` (the official ``sct_mlp``): x ← x + ls2(SCT(mlp(norm2(x)))), on the MLP's output inside its
  residual (before LayerScale and drop-path). Calibrated, as the official code does, on the block's output
  (its forward hook on ``blocks.i``), not on the MLP's output where the module acts.
- ``mlp`` (vistune 0.1.0's variant, not the official one; kept so its artifacts compute what they computed):
  x ← SCT(x + ls2(mlp(norm2(x)))), on the block's output; calibrated there.

To sit inside the block, each stock timm block (ViT ``Block``, Swin ``SwinTransformerBlock``) is wrapped
in :class:`SCTBlock`, whose forward re-composes the block's own forward from the block's OWN stock
submodules (norm1, attn / Swin's ``_attn``, ls1, drop_path1, norm2, mlp, ls2, drop_path2) in
timm's exact order; attention itself is never rewritten. Without an SCT module (or with a zero
one) the wrapped block is bit-identical to the stock block. Other block types get the reading below.
Swin: K is taken per stage (stage width × ratio); the official Swin code has ``sct_attn`` only, the other two
placements sit at the same points of the Swin block.

Every other backbone — CNNs and any timm model without stock ViT/Swin blocks (this library's reading
of SCT for them; EVA, BEiT and Swin V2 blocks too): the same idea on the channels at the OUTPUT of each
stage (the view's ``stages()``, from timm's ``feature_info``; every stage is wrapped; on plain-sequence
models such as EVA every block is a stage). Calibration: per class, the L2 norm of each channel over
samples × spatial positions (or tokens); module on NCHW maps: ``x[:, idx] += Conv1x1(K→K)(x[:, idx])``,
implemented as a Linear on the channel dimension (identical parameters: K² + K); on channels-last maps
and token sequences the same Linear on the last dimension. ``placement`` does not apply there.

Before :meth:`SCT.prepare` (or :func:`calibrate` + :meth:`SCT.set_channels`) runs, each layer's
indices are the first K channels and their scores are zero, so the model works (and is trained
by ``vistune train``, which always calibrates first) but is not yet SCT proper.

Counts: ViT-B/16 with K = 96 (= 768/8): 12 · (96² + 96) = 111,744 tuned parameters besides the head.
Recipe of the paper: AdamW (this method's default optimizer), 100 epochs, 10 warm-up, cosine.
Unlike the official code, model selection is on val, the artifact holds the SCT weights and
indices, there is no inert ``scale`` option, and no device is hard-coded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backbones import BackboneView
from ..backbones.base import Layout, replace_module
from ..errors import VistuneError
from .base import Borrowed, MethodConfig, ModuleTuner, option, register

PLACEMENTS = ("attn", "mlp-branch", "mlp")
# where calibration reads the residual stream: norm2's input, or the block's output (as the official sct_mlp)
CALIBRATION_POINT = {"attn": "norm2 input", "mlp-branch": "block output", "mlp": "block output"}


@dataclass
class SCTConfig(MethodConfig):
    top_k: int | None = option(None, "salient channels K per layer/stage (default: round(D · ratio))")
    ratio: float = option(1 / 8, "K = round(D · ratio), at least 1, when top_k is not set (paper: D/8 = 96 on ViT-B)")
    placement: Literal["attn", "mlp-branch", "mlp"] = option(
        "attn", "ViT/Swin: attn = after the attention residual (input of norm2; the paper's, official sct_attn); "
                "mlp-branch = on the MLP output inside its residual (official sct_mlp); mlp = after the MLP "
                "residual (block output; vistune 0.1.0's variant). CNNs: always the stage output"
    )

    def validate(self):
        if self.top_k is not None and self.top_k < 1:
            raise VistuneError(f"sct: top_k={self.top_k} must be ≥ 1 (or none)", "e.g. --set top_k=96")
        if not 0 < self.ratio <= 1:
            raise VistuneError(f"sct: ratio={self.ratio} must be in (0, 1]", "e.g. --set ratio=0.125")
        if self.placement not in PLACEMENTS:
            raise VistuneError(f"sct: placement={self.placement!r} is not one of {list(PLACEMENTS)}",
                               "use --set placement=attn (the paper's), mlp-branch (official sct_mlp) or mlp")


def num_salient(dim: int, top_k: int | None = None, ratio: float = 1 / 8, where: str = "a layer") -> int:
    """K for a layer of width ``dim``: ``top_k`` if given, else round(dim · ratio), at least 1."""
    k = top_k if top_k is not None else max(1, round(dim * ratio))
    if k > dim:
        raise VistuneError(f"sct: top_k={k} exceeds the {dim} channels of {where}",
                           f"use --set top_k={dim} or less, or set ratio instead")
    return k


# ---------------------------------------------------------------------------------------- modules
class SalientChannels(nn.Module):
    """``x[idx] += Linear(K, K)(x[idx])`` on one channel dimension, out of place.

    ``index`` (int64, K) and ``score`` (K) are buffers: saved with the artifact, restored on load."""

    def __init__(self, dim: int, k: int, channel_dim: int = -1):
        super().__init__()
        if not 1 <= k <= dim:
            raise ValueError(f"k={k} must be in 1..{dim}")
        self.dim, self.k, self.channel_dim = dim, k, channel_dim
        self.linear = nn.Linear(k, k)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("index", torch.arange(k, dtype=torch.long))
        self.register_buffer("score", torch.zeros(k))

    @torch.no_grad()
    def set_channels(self, index: torch.Tensor, score: torch.Tensor) -> None:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() != self.k or index.min() < 0 or index.max() >= self.dim or index.unique().numel() != self.k:
            raise ValueError(f"need {self.k} distinct channel indices in 0..{self.dim - 1}, got {index.tolist()}")
        self.index.copy_(index.to(self.index.device))
        self.score.copy_(torch.as_tensor(score, dtype=self.score.dtype).reshape(-1).to(self.score.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.channel_dim
        selected = x.index_select(cd, self.index)
        if cd in (-1, x.ndim - 1):
            delta = self.linear(selected)
        else:  # channels-first feature map: a 1×1 conv = the Linear on the channel dimension
            delta = self.linear(selected.movedim(cd, -1)).movedim(-1, cd)
        return x.index_add(cd, self.index, delta.to(x.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, k={self.k}, channel_dim={self.channel_dim}"


def _block_kind(block: nn.Module) -> str | None:
    """'vit' / 'swin' for timm's stock blocks (forward not overridden), else None."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    if isinstance(block, Block) and type(block).forward is Block.forward and all(
            hasattr(block, a) for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")):
        return "vit"
    if isinstance(block, SwinTransformerBlock) and type(block).forward is SwinTransformerBlock.forward and all(
            hasattr(block, a) for a in ("norm1", "_attn", "drop_path1", "norm2", "mlp", "drop_path2")):
        return "swin"
    return None


class SCTBlock(nn.Module):
    """A stock timm transformer block with an SCT module at ``placement`` (see the module docstring).

    The forward re-composes timm's own ``Block.forward`` / ``SwinTransformerBlock.forward`` from
    the block's stock submodules; with no SCT module (or ``enabled = False``) the output is
    bit-identical to the stock block's."""

    def __init__(self, block: nn.Module, sct: SalientChannels | None, placement: str, name: str = "block"):
        super().__init__()
        kind = _block_kind(block)
        if kind is None:
            raise VistuneError(
                f"sct: {name} is a {type(block).__module__}.{type(block).__name__}, not timm's stock ViT "
                "Block or SwinTransformerBlock (x + attn(norm1(x)), then x + mlp(norm2(x))), so SCT has no "
                "place between the attention and the MLP residual in it",
                "use a backbone built from timm's standard ViT/DeiT/DINOv2/CLIP Block or Swin block, "
                "or another method (adapter, bias, vpt-deep)",
            )
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}")
        self.block, self.kind, self.placement = block, kind, placement
        self._sct = Borrowed(sct)  # owned (and saved) by the SCT method
        self.enabled = True

    @property
    def sct(self) -> SalientChannels | None:
        return self._sct.value

    def _tune(self, x: torch.Tensor) -> torch.Tensor:
        return self.sct(x) if self.enabled and self.sct is not None else x

    def _branch(self, mlp_out: torch.Tensor) -> torch.Tensor:
        return self._tune(mlp_out) if self.placement == "mlp-branch" else mlp_out

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        b = self.block
        if self.kind == "vit":
            h = b.norm1(x)
            # timm's Block passes these through to its attention; the defaults are the same call
            a = b.attn(h) if attn_mask is None and not is_causal else b.attn(h, attn_mask=attn_mask, is_causal=is_causal)
            x = x + b.drop_path1(b.ls1(a))
            if self.placement == "attn":
                x = self._tune(x)
            x = x + b.drop_path2(b.ls2(self._branch(b.mlp(b.norm2(x)))))
        else:  # swin: NHWC in and out, tokens flattened around the MLP (as SwinTransformerBlock.forward)
            B, H, W, C = x.shape
            x = x + b.drop_path1(b._attn(b.norm1(x)))
            x = x.reshape(B, -1, C)
            if self.placement == "attn":
                x = self._tune(x)
            x = x + b.drop_path2(self._branch(b.mlp(b.norm2(x))))
            x = x.reshape(B, H, W, C)
        if self.placement == "mlp":
            x = self._tune(x)
        return x

    def set_input_size(self, *args, **kwargs):  # SwinTransformer.set_input_size reaches every block
        return self.block.set_input_size(*args, **kwargs)


class SCTStage(nn.Module):
    """A stage followed by an SCT module on its output channels (NCHW maps: dim 1; else the last dim)."""

    def __init__(self, stage: nn.Module, sct: SalientChannels | None):
        super().__init__()
        self.inner = stage
        self._sct = Borrowed(sct)  # owned (and saved) by the SCT method
        self.enabled = True

    @property
    def sct(self) -> SalientChannels | None:
        return self._sct.value

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.inner(x, *args, **kwargs)  # e.g. EVA's rope=, BEiT's shared_rel_pos_bias=
        return self.sct(x) if self.enabled and self.sct is not None else x


def _unwrap(m: nn.Module) -> nn.Module:
    if isinstance(m, SCTBlock):
        return m.block
    if isinstance(m, SCTStage):
        return m.inner
    return m


def _between_residuals(view: BackboneView) -> bool:
    """True when every block is timm's stock ViT/Swin block, so SCT sits between its residuals; else SCT sits at
    the stage outputs."""
    return view.transformer and all(_block_kind(_unwrap(b)) is not None for b in view.blocks())


def _layers(view: BackboneView) -> list[nn.Module]:
    """The layers SCT tunes: transformer blocks (flattened over Swin stages) or stages."""
    return view.blocks() if _between_residuals(view) else view.stages()


def _stage_layouts(view: BackboneView, layers: list[nn.Module]) -> list[Layout]:
    """Each stage's output layout: its channels and the dimension that holds them."""
    layouts = view.layouts([_unwrap(m) for m in layers])
    for name, layout in zip(view.module_names(layers), layouts):
        if layout is None:
            raise VistuneError(f"sct: stage {name} of {view.spec.name!r} does not output one feature map or token "
                               "tensor, so it has no channels to select", "use another method on this backbone")
    return layouts


# ------------------------------------------------------------------------------------ calibration
@dataclass
class LayerChannels:
    """One layer's calibration: its K salient channels (ascending channel order) and their scores."""

    name: str
    dim: int
    indices: torch.Tensor  # (K,) int64
    scores: torch.Tensor  # (K,) class-aware scores of those channels
    all_scores: torch.Tensor  # (D,) class-aware score of every channel

    def to_dict(self, all_scores: bool = True) -> dict:
        d = {"name": self.name, "dim": self.dim, "k": len(self.indices), "indices": self.indices.tolist(),
             "scores": self.scores.tolist()}
        if all_scores:
            d["all_scores"] = self.all_scores.tolist()
        return d


@dataclass
class Calibration:
    layers: list[LayerChannels]
    placement: str
    num_images: int
    class_counts: dict[int, int] = field(default_factory=dict)  # images per class seen

    def to_dict(self) -> dict:
        return {"placement": self.placement, "num_images": self.num_images,
                "class_counts": {str(k): v for k, v in self.class_counts.items()},
                "layers": [layer.to_dict() for layer in self.layers]}


class _Stop(Exception):
    """Raised by the last layer's hook: nothing after it is needed."""


def calibrate(model_or_backbone: BackboneView | "SCT", dataset, *, placement: str = "attn",
              top_k: int | None = None, ratio: float = 1 / 8, batch_size: int = 64,
              device: str | torch.device | None = None, progress: bool = False) -> Calibration:
    """SCT's class-aware channel scores and top-K channels per layer, from one pass over ``dataset``.

    ``model_or_backbone``: a frozen :class:`BackboneView`, or an :class:`SCT` model (then its own
    placement/K are used and its SCT modules are switched off during the pass, so the scores are
    the frozen backbone's). ``dataset`` yields ``(image tensor, int label)``; give it un-augmented.
    ``device``: where to run (the module is moved there); default: where its parameters are.
    """
    sct_model = model_or_backbone if isinstance(model_or_backbone, SCT) else None
    if sct_model is not None:
        view = sct_model.backbone
        cfg = sct_model.config
        placement, top_k, ratio = cfg.placement, cfg.top_k, cfg.ratio
    elif isinstance(model_or_backbone, BackboneView):
        view = model_or_backbone
    else:
        raise VistuneError(f"sct: cannot calibrate a {type(model_or_backbone).__name__}",
                           "pass a backbone view (vistune.backbones.load_backbone) or an SCT model")
    if placement not in PLACEMENTS:
        raise VistuneError(f"sct: placement={placement!r} is not one of {list(PLACEMENTS)}")
    if device is not None:
        model_or_backbone.to(torch.device(device))
    dev = next(view.model.parameters()).device
    acc_dtype = torch.float64 if dev.type in ("cpu", "cuda") else torch.float32
    layers = _layers(view)
    names = view.module_names(layers)
    blocks = _between_residuals(view)
    channels_first = [False] * len(layers) if blocks else [lay.kind == "nchw" for lay in _stage_layouts(view, layers)]
    prefix = getattr(view, "num_prefix_tokens", 0) if "tokens" in view.seams else 0
    sums: list[torch.Tensor | None] = [None] * len(layers)  # (classes, D) sums of squares
    state: dict = {"labels": None, "classes": 0}

    def accumulate(i: int, stream: torch.Tensor) -> None:
        if channels_first[i]:  # (B, C, H, W)
            sq = stream.float().pow(2).flatten(2).sum(2)
        else:  # (B, tokens…, D): ViT (B, N, D) with prefix tokens dropped, Swin (B, HW, D) or (B, H, W, D)
            if prefix and stream.ndim == 3:
                stream = stream[:, prefix:]
            sq = stream.float().pow(2).reshape(stream.shape[0], -1, stream.shape[-1]).sum(1)
        if sums[i] is None or sums[i].shape[0] < state["classes"]:
            grown = torch.zeros(state["classes"], sq.shape[1], dtype=acc_dtype, device=sq.device)
            if sums[i] is not None:
                grown[: sums[i].shape[0]] = sums[i]
            sums[i] = grown
        sums[i].index_add_(0, state["labels"], sq.to(acc_dtype))
        if i == len(layers) - 1:
            raise _Stop

    hooks = []
    for i, layer in enumerate(layers):
        stock = _unwrap(layer)
        if not blocks:
            hooks.append(stock.register_forward_hook(lambda m, a, out, i=i: accumulate(i, out)))
        elif CALIBRATION_POINT[placement] == "norm2 input":
            hooks.append(stock.norm2.register_forward_pre_hook(lambda m, a, i=i: accumulate(i, a[0])))
        else:  # block output (mlp-branch too, as the official sct_mlp): the wrapper's (SCT off) = the stock block's
            hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: accumulate(i, out)))

    counts: dict[int, int] = {}
    num_images = 0
    was_training = view.training
    wrappers = [m for m in view.model.modules() if isinstance(m, (SCTBlock, SCTStage))]
    switched = [(w, w.enabled) for w in wrappers]
    try:
        for w in wrappers:
            w.enabled = False
        view.eval()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        with torch.no_grad():
            for x, y in tqdm(loader, desc="sct calibration", disable=None if progress else True, leave=False):
                y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
                if len(y) and int(y.min()) < 0:
                    raise VistuneError(f"sct: calibration data has a negative label {int(y.min())}")
                state["labels"] = y.to(dev)
                state["classes"] = max(state["classes"], int(y.max()) + 1 if len(y) else 0)
                for c in y.tolist():
                    counts[c] = counts.get(c, 0) + 1
                num_images += len(y)
                try:
                    view.forward_features(x.to(dev))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
        for w, enabled in switched:
            w.enabled = enabled
        view.train(was_training)
    if num_images == 0:
        raise VistuneError("sct: the calibration data set is empty", "calibrate on the training split")
    present = torch.tensor(sorted(counts), dtype=torch.long)
    result = []
    for name, s in zip(names, sums):
        per_class = s[present.to(s.device)].sqrt()  # L2 norm over samples × tokens, per class: (C', D)
        score = per_class.mean(0).float().cpu()  # class-aware: the mean over the classes present
        dim = score.numel()
        k = num_salient(dim, top_k, ratio, where=f"layer {name}")
        idx = torch.topk(score, k).indices.sort().values
        result.append(LayerChannels(name, dim, idx, score[idx], score))
    return Calibration(result, placement if blocks else "stage", num_images, dict(sorted(counts.items())))


# ------------------------------------------------------------------------------------------ method
@register("sct", category="parameter",
          description="Salient Channel Tuning: a KxK linear on each layer's top-K class-salient channels "
                      "(calibrated on the training set)")
class SCT(ModuleTuner):
    Config = SCTConfig
    default_optimizer = "adamw"  # the paper's recipe; docs/defaults.md: measured against the lr grid
    # base lr (× batch/256): the earlier 0.01 reached 0.69 of the best (0.1) on the own ViT × fashion-mnist, and
    # 0.05 0.89 of it on mnist5k; on the CNNs 0.05 (their earlier default) reached 0.80 of the best (0.1) on
    # EfficientNet-Lite0 × clevr-count over three seeds, 0.1 ≥ 0.98 in every CNN cell (docs/defaults.md)
    default_lrs = {"adamw": 0.1}

    def attach(self):
        backbone, config = self.backbone, self.config
        layers = _layers(backbone)
        self.layer_names = backbone.module_names(layers)
        modules = []
        if not _between_residuals(backbone):
            wrappers = []
            for name, stage, layout in zip(self.layer_names, layers, _stage_layouts(backbone, layers)):
                dim = layout.channels
                sct = SalientChannels(dim, num_salient(dim, config.top_k, config.ratio, f"stage {name}"),
                                      channel_dim=layout.channel_dim)
                modules.append(sct)
                wrappers.append((name, SCTStage(stage, sct)))
        else:
            wrappers = []
            for name, block in zip(self.layer_names, layers):
                dim = backbone.embed_dim if "tokens" in backbone.seams else block.mlp.fc1.in_features
                sct = SalientChannels(dim, num_salient(dim, config.top_k, config.ratio, f"block {name}"))
                wrappers.append((name, SCTBlock(block, sct, config.placement, name)))  # checks the type
                modules.append(sct)
        for name, wrapper in wrappers:  # only after every layer passed the checks
            replace_module(backbone.model, name, wrapper)
        self.sct = nn.ModuleList(modules)

    @property
    def calibrated(self) -> bool:
        """True once real scores are stored (by :meth:`prepare` or :meth:`set_channels`)."""
        return any(bool(m.score.abs().sum() > 0) for m in self.sct)

    def set_channels(self, calibration: Calibration) -> None:
        if len(calibration.layers) != len(self.sct):
            raise VistuneError(f"sct: calibration has {len(calibration.layers)} layers, the model {len(self.sct)}")
        for module, layer in zip(self.sct, calibration.layers):
            module.set_channels(layer.indices, layer.scores)

    def channels(self) -> list[dict]:
        """Per layer: name, indices, scores (as stored in the model / artifact)."""
        return [{"name": n, "indices": m.index.tolist(), "scores": m.score.tolist()}
                for n, m in zip(self.layer_names, self.sct)]

    def prepare(self, train_set, *, device: torch.device, batch_size: int, progress: bool) -> None:
        """The calibration pass over the (un-augmented) training set; stores indices and scores."""
        self.set_channels(calibrate(self, train_set, batch_size=batch_size, device=device, progress=progress))


__all__ = ["SCT", "SCTConfig", "SCTBlock", "SCTStage", "SalientChannels", "Calibration", "LayerChannels",
           "calibrate", "num_salient"]
