"""Many tasks, one frozen backbone: mixed-batch multi-task inference.

``MultiTask(backbone, artifacts)`` keeps ONE frozen backbone in memory and N task artifacts on it (each a few
KiB for most methods); ``forward(images, tasks)`` gives every image the logits of its own task, in one backbone
pass wherever the math allows it.

**How.** The tasks' models are loaded with :func:`vistune.artifacts.load_artifact` on the shared backbone, so each
is a module tree that shares every frozen tensor with it. One more such tree, the *trunk*, runs the batch: at
every position where some task's tree differs from the stock model, the trunk holds a *mixer* that computes, for
the rows of each task, what that task's module computes there, and the stock function for every other row. The
batch is laid out task by task (contiguous segments, as punica/S-LoRA lay out LoRA batches), so a task's part
reads and writes one slice of rows. What each mixer does:

===============================  ==========================================================================
a task's change at a position    the mixer
===============================  ==========================================================================
bias of a Linear/Conv (bias),    the frozen op once on the whole batch, then per-row scale and shift
SSF's ``ScaleShift``, IA3        vectors (IA3 on fc2: a per-row input scale before the frozen op)
LoRA / DoRA (peft layers, also   the frozen op once; each task's low-rank update on its own rows
on the split qkv)                (DoRA: and its per-row magnitude scale)
a norm's affine/statistics       the norm's normalisation once, then per-row weight and bias (batch norm:
(bias, SSF, LN-tuning, partial)  per-row affine from each task's statistics)
adapter's ``AdaptedOutput``,     the frozen module once; each task's bottleneck / salient-channel Linear /
SCT (``SCTBlock``/``SCTStage``), prompt block on its rows' output (or input) — SCT at the attention
Pro-tuning's ``Prompted``        residual re-composes the block with SCT's own ``SCTBlock``
VPT on Swin (prompted window     one window attention for the batch: each window attends to its task's
attention)                       prompt keys/values, padded to the longest and masked out beyond
other weight changes (partial's  grouped: that module runs once per task group on its rows (the task's own
blocks, Swin's bias tables)      module), everything around it once
===============================  ==========================================================================

At the top level: head-only methods add nothing to the trunk (per-task heads); VPT and PGN on the ViT family
give each row its own prompts through the token seam ``ViTView.forward_tokens`` — rows are **grouped by prompt
length**, one pass per length (tasks with equal prompt counts, e.g. VPT's default 10, share a pass; head-only and
module methods are length 0): exact, no padded tokens and no attention mask through timm's blocks, and
Pro-tuning's token grid keeps its shape. VPT-pad's border is drawn per row before the pass; side-tuning shares
the frozen feature and runs its side network on its rows; methods that tune every backbone weight (full) or
that this module does not know run as their own pass in the same call. Images of different sizes (tasks trained
at other resolutions) run as one pass per size.

The result of a call equals each artifact run alone up to float rounding (tests check 1e-5). The trunk is built
when the task set changes (``add``/``remove``); task parameters must not change while loaded (inference only).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, GroupNorm, LayerNorm, LayerNorm2d
from torch import nn

from .artifacts import load_artifact, read_meta
from .backbones import BackboneView
from .errors import VistuneError
from .methods import Method
from .methods.adapter import AdaptedOutput
from .methods.peft_common import ADAPTER_NAME, QKV, FusedSlice, SplitQKV
from .methods.pgn import PGN
from .methods.pro_tuning import Prompted
from .methods.sct import SCTBlock, SCTStage
from .methods.sidetune import Sidetune
from .methods.ssf import ScaleShift
from .methods.vpt import PromptedWindowAttention, VPTShallow
from .methods.vpt_pad import VPTPad

__all__ = ["MultiTask", "MixedLogits", "TaskInfo"]

# norm layers whose function is normalise(x) · weight + bias on one channel dimension (exact types: a subclass may
# compute something else); anything else a task changes is run grouped
_LAST_DIM_NORMS = (nn.LayerNorm, LayerNorm)
_CHANNEL_NORMS = (LayerNorm2d, nn.GroupNorm, GroupNorm)
_BATCH_NORMS = (nn.BatchNorm2d, BatchNormAct2d)
# methods whose features() the top level knows how to share (every other method uses Method.features)
_KNOWN_FEATURES = (VPTShallow, PGN, VPTPad, Sidetune)


# --------------------------------------------------------------------------------------------- routing
@dataclass
class _Layout:
    """Which rows of an input belong to which task slot: contiguous ``(slot, start, stop)`` segments."""

    segments: list[tuple[int, int, int]]
    n: int
    device: torch.device
    _ids: torch.Tensor | None = None

    @property
    def slots(self) -> set[int]:
        return {s for s, _, _ in self.segments}

    @property
    def ids(self) -> torch.Tensor:
        """(n,) the slot of every row."""
        if self._ids is None:
            self._ids = torch.cat([torch.full((e - s,), slot, dtype=torch.long) for slot, s, e in self.segments]
                                  ).to(self.device)
        return self._ids

    def scaled(self, k: int) -> "_Layout":
        return _Layout([(slot, s * k, e * k) for slot, s, e in self.segments], self.n * k, self.device)


class Routing:
    """The task slots of the rows now running, read by every mixer of a trunk.

    A mixer asks for the layout of its input's first dimension: the batch itself, or a multiple of it laid out
    sample-major (Swin's windows: every window of sample 0, then of sample 1, …)."""

    def __init__(self):
        self._frames: list[dict[int, _Layout]] = []

    @contextlib.contextmanager
    def rows(self, segments: list[tuple[int, int, int]], device: torch.device):
        n = segments[-1][2] if segments else 0
        self._frames.append({n: _Layout(segments, n, device)})
        try:
            yield
        finally:
            self._frames.pop()

    def layout(self, n: int) -> _Layout:
        if not self._frames:
            raise RuntimeError("a multi-task trunk module ran outside MultiTask.forward (no rows are routed)")
        frame = self._frames[-1]
        if n not in frame:
            base = next(iter(frame.values()))
            if base.n == 0 or n % base.n:
                raise RuntimeError(f"a multi-task mixer got {n} rows for a batch of {base.n}")
            frame[n] = base.scaled(n // base.n)
        return frame[n]


def _rows_of(table: torch.Tensor, layout: _Layout, ndim: int, channel_dim: int) -> torch.Tensor:
    """Per-row vectors of a (slots, C) table, shaped to broadcast over an input of ``ndim`` dims."""
    if len(layout.segments) == 1:
        rows = table[layout.segments[0][0]].unsqueeze(0)
    else:
        rows = table[layout.ids]
    shape = [rows.shape[0]] + [1] * (ndim - 1)
    shape[channel_dim] = rows.shape[1]
    return rows.view(shape)


# ---------------------------------------------------------------------------------------------- mixers
class _PerRow(nn.Module):
    """The input with the rows of each listed slot replaced by that slot's function of them."""

    def __init__(self, routing: Routing, fns: dict[int, Callable]):
        super().__init__()
        self.routing, self.fns = routing, fns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.routing.layout(x.shape[0])
        if not layout.slots & self.fns.keys():
            return x
        return torch.cat([self.fns[slot](x[s:e]) if slot in self.fns else x[s:e] for slot, s, e in layout.segments])


class _Then(nn.Module):
    """A module, then per-row parts on its output (adapters, SCT at a block/stage output, CNN prompt blocks)."""

    def __init__(self, shared: nn.Module, after: _PerRow):
        super().__init__()
        self.shared, self.after = shared, after

    def forward(self, x, *args, **kwargs):
        return self.after(self.shared(x, *args, **kwargs))


class _First(nn.Module):
    """Per-row parts on a module's input, then the module (Pro-tuning's token / NHWC prompts)."""

    def __init__(self, before: _PerRow, shared: nn.Module):
        super().__init__()
        self.before, self.shared = before, shared

    def forward(self, x, *args, **kwargs):
        return self.shared(self.before(x), *args, **kwargs)


class _Grouped(nn.Module):
    """The rows of some slots run through that slot's own module; all other rows through the shared one.

    Extra arguments (Swin's window mask) are passed on as they are: they are per window position, not per row."""

    def __init__(self, shared: nn.Module, routing: Routing, own: dict[int, nn.Module]):
        super().__init__()
        self.shared, self.routing = shared, routing
        self.own = own  # the tasks' modules (owned by their models, not registered here)

    def forward(self, x, *args, **kwargs):
        layout = self.routing.layout(x.shape[0])
        if not layout.slots & self.own.keys():
            return self.shared(x, *args, **kwargs)
        rest = [(slot, s, e) for slot, s, e in layout.segments if slot not in self.own]
        shared_out = []
        if rest:
            rebased, start = [], 0
            for slot, s, e in rest:
                rebased.append((slot, start, start + e - s))
                start += e - s
            with self.routing.rows(rebased, x.device):
                y = self.shared(torch.cat([x[s:e] for _, s, e in rest]), *args, **kwargs)
            shared_out = list(y.split([e - s for _, s, e in rest]))
        parts = []
        for slot, s, e in layout.segments:
            parts.append(self.own[slot](x[s:e], *args, **kwargs) if slot in self.own else shared_out.pop(0))
        return torch.cat(parts)


@dataclass
class _LinearEdit:
    """One task's change of a frozen Linear/Conv op, relative to its stock output y0 = W x + b:
    y = scale ⊙ (y0' + Σ deltas(x)) + shift, where y0' is the frozen op on in_scale ⊙ x."""

    out_features: int
    in_scale: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    deltas: list[tuple[slice, Callable]] = field(default_factory=list)

    def part(self, rows: slice, scale=None, shift=None, delta=None) -> None:
        """Add a change of the output rows ``rows`` (a slice of a fused qkv, or all of them)."""
        if scale is not None:
            if self.scale is None:
                self.scale = scale.new_ones(self.out_features)
            self.scale = self.scale.clone()
            self.scale[rows] = scale
        if shift is not None:
            if self.shift is None:
                self.shift = shift.new_zeros(self.out_features)
            self.shift = self.shift.clone()
            self.shift[rows] = shift
        if delta is not None:
            self.deltas.append((rows, delta))


class _LinearMix(nn.Module):
    """A frozen Linear/Conv run once on the whole batch, with each task's per-row scale, shift, input scale and
    low-rank updates (LoRA/DoRA) added on its own rows."""

    def __init__(self, shared: nn.Module, routing: Routing, edits: dict[int, _LinearEdit], num_slots: int):
        super().__init__()
        self.shared, self.routing, self.edits = shared, routing, edits
        self.channel_dim = -1 if isinstance(shared, nn.Linear) else 1
        w = shared.weight
        out_c = edits[next(iter(edits))].out_features
        in_c = w.shape[1] * (getattr(shared, "groups", 1) or 1)
        self.in_slots = {s for s, e in edits.items() if e.in_scale is not None}
        self.affine_slots = {s for s, e in edits.items() if e.scale is not None or e.shift is not None}
        self.delta_slots = {s for s, e in edits.items() if e.deltas}
        affine = bool(self.affine_slots)  # scale and shift go together (one addcmul)
        self.register_buffer("in_scale", self._table(num_slots, in_c, 1.0, "in_scale", w, bool(self.in_slots)),
                             persistent=False)
        self.register_buffer("scale", self._table(num_slots, out_c, 1.0, "scale", w, affine), persistent=False)
        self.register_buffer("shift", self._table(num_slots, out_c, 0.0, "shift", w, affine), persistent=False)

    def _table(self, num_slots: int, width: int, fill: float, name: str, like: torch.Tensor, needed: bool):
        """(slots, width): each slot's vector, ``fill`` for the slots that have none (None when none needs it)."""
        if not needed:
            return None
        rows = {s: getattr(e, name) for s, e in self.edits.items() if getattr(e, name) is not None}
        table = torch.full((num_slots, width), fill, dtype=like.dtype, device=like.device)
        for s, v in rows.items():
            table[s] = v.detach().reshape(-1).to(table)
        return table

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layout = self.routing.layout(x.shape[0])
        present = layout.slots & self.edits.keys()
        if not present:
            return self.shared(x, *args, **kwargs)
        cd = self.channel_dim
        x_in = x * _rows_of(self.in_scale, layout, x.ndim, cd) if present & self.in_slots else x
        y = self.shared(x_in, *args, **kwargs)
        if present & self.affine_slots:
            y = torch.addcmul(_rows_of(self.shift, layout, y.ndim, cd), y, _rows_of(self.scale, layout, y.ndim, cd))
        if not present & self.delta_slots:
            return y
        parts = []
        for slot, s, e in layout.segments:
            part = y[s:e]
            edit = self.edits.get(slot)
            if edit is not None and edit.deltas:
                delta = torch.zeros_like(part)
                for rows, fn in edit.deltas:
                    d = fn(x[s:e])
                    if cd == -1:
                        delta[..., rows] += d
                    else:
                        delta[:, rows] += d
                if edit.scale is not None:  # DoRA: the magnitude scales the update too
                    shape = [1] * y.ndim
                    shape[cd] = -1
                    delta = delta * self.scale[slot].view(shape)
                part = part + delta
            parts.append(part)
        return torch.cat(parts)


@dataclass
class _NormParams:
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None


def _norm_params(module: nn.Module, weight=None, bias=None) -> _NormParams:
    w = module.weight if weight is None else weight
    b = module.bias if bias is None else bias
    if b is None:
        b = torch.zeros_like(w)
    return _NormParams(w.detach(), b.detach(), getattr(module, "running_mean", None),
                       getattr(module, "running_var", None))


def _is_norm(m: nn.Module) -> bool:
    return type(m) in _LAST_DIM_NORMS + _CHANNEL_NORMS + _BATCH_NORMS and getattr(m, "weight", None) is not None


def _is_linear_op(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, FusedSlice)


class _NormMix(nn.Module):
    """A norm layer whose normalisation runs once on the batch, with each row's task's weight and bias (batch norm
    in eval mode: the per-channel affine of each task's statistics, then the layer's own activation)."""

    def __init__(self, shared: nn.Module, routing: Routing, edits: dict[int, _NormParams], num_slots: int):
        super().__init__()
        self.shared, self.routing, self.edited = shared, routing, set(edits)
        stock = _norm_params(shared)
        params = [edits.get(s, stock) for s in range(num_slots)]
        self.batch = isinstance(shared, _BATCH_NORMS)
        if self.batch:
            eps = shared.eps
            scale = [p.weight / torch.sqrt(p.running_var + eps) for p in params]
            shift = [p.bias - p.running_mean * a for p, a in zip(params, scale)]
            self.channel_dim = 1
        else:
            scale, shift = [p.weight for p in params], [p.bias for p in params]
            self.channel_dim = -1 if type(shared) in _LAST_DIM_NORMS else 1
        self.register_buffer("scale", torch.stack(scale).detach(), persistent=False)
        self.register_buffer("shift", torch.stack(shift).detach(), persistent=False)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        m = self.shared
        if self.batch:
            return x
        if isinstance(m, LayerNorm2d):
            return F.layer_norm(x.permute(0, 2, 3, 1), m.normalized_shape, None, None, m.eps).permute(0, 3, 1, 2)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.routing.layout(x.shape[0])
        if not layout.slots & self.edited:
            return self.shared(x)
        cd = self.channel_dim
        y = torch.addcmul(_rows_of(self.shift, layout, x.ndim, cd), self._normalise(x),
                          _rows_of(self.scale, layout, x.ndim, cd))
        if isinstance(self.shared, BatchNormAct2d):
            y = self.shared.act(self.shared.drop(y))
        return y


class _PromptedWindows(nn.Module):
    """Swin window attention for a mixed batch: the windows of a VPT task attend to its prompt keys/values too.

    The prompt sets are padded to the longest one present and masked out beyond each task's own (-inf), so a
    window of a task without prompts at this block computes exactly the stock attention. The prompts' keys and
    values are computed once, when the trunk is built (the prompts, the block's norm1 and qkv are fixed)."""

    def __init__(self, shared: nn.Module, routing: Routing, prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.shared, self.routing, self.prompt_kv = shared, routing, prompt_kv

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        layout = self.routing.layout(x.shape[0])
        present = layout.slots & self.prompt_kv.keys()
        if not present:
            return self.shared(x, mask)
        a = self.shared
        b_, n, _ = x.shape
        heads = a.num_heads
        q, k, v = a.qkv(x).reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        longest = max(self.prompt_kv[s][0].shape[1] for s in present)
        pk = q.new_zeros(b_, heads, longest, q.shape[-1])
        pv = torch.zeros_like(pk)
        keep = q.new_full((b_, 1, 1, longest), float("-inf"))
        for slot, s, e in layout.segments:
            if slot in present:
                kk, vv = self.prompt_kv[slot]
                p = kk.shape[1]
                pk[s:e, :, :p], pv[s:e, :, :p], keep[s:e, ..., :p] = kk, vv, 0.0
        bias = a._get_rel_pos_bias()  # (1, heads, n, n): patch→patch
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, nw, 1, n, n)).expand(b_ // nw, -1, -1, -1, -1)
        bias = bias.reshape(-1, heads, n, n).expand(b_, -1, -1, -1)
        attn_mask = torch.cat([keep.expand(-1, heads, n, -1), bias], dim=-1).to(q.dtype)
        out = F.scaled_dot_product_attention(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2),
                                             attn_mask=attn_mask)
        return a.proj_drop(a.proj(out.transpose(1, 2).reshape(b_, n, -1)))


@torch.no_grad()
def _prompt_kv(wrapper: PromptedWindowAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """A VPT-Swin block's prompt keys and values (heads, p, head_dim), as PromptedWindowAttention computes them."""
    a = wrapper.inner
    prompts = wrapper.prompts.value if wrapper.project.value is None else wrapper.project.value(wrapper.prompts.value)
    prompts = wrapper.norm(wrapper.dropout(prompts))
    p = prompts.shape[0]
    _, pk, pv = a.qkv(prompts).reshape(p, 3, a.num_heads, -1).permute(1, 2, 0, 3).unbind(0)
    return pk.contiguous(), pv.contiguous()


# --------------------------------------------------------------------------------------- building a trunk
@dataclass
class _Edits:
    """Every task's change at one position of the module tree."""

    linear: dict[int, _LinearEdit] = field(default_factory=dict)
    norm: dict[int, _NormParams] = field(default_factory=dict)
    prompts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    sct_attn: dict[int, Callable] = field(default_factory=dict)
    inputs: dict[int, Callable] = field(default_factory=dict)
    outputs: dict[int, Callable] = field(default_factory=dict)
    replace: dict[int, nn.Module] = field(default_factory=dict)

    def linear_of(self, slot: int, module: nn.Module) -> _LinearEdit:
        if slot not in self.linear:
            self.linear[slot] = _LinearEdit(module.weight.shape[0])
        return self.linear[slot]


def _own_tensors_changed(stock: nn.Module, task: nn.Module) -> list[str]:
    """Names of the parameters and buffers a task's module holds in storage of its own (tuned ones)."""
    changed = []
    for own, ref in ((task._parameters, stock._parameters), (task._buffers, stock._buffers)):
        for name, t in own.items():
            r = ref.get(name)
            if t is None and r is None:
                continue
            if t is None or r is None or t.data_ptr() != r.data_ptr() or t.shape != r.shape:
                changed.append(name)
    return changed


class _Builder:
    def __init__(self, routing: Routing, num_slots: int):
        self.routing, self.num_slots = routing, num_slots
        self.grouped: dict[int, list[str]] = {}  # slot → positions where it runs its own module

    def mix(self, shared: nn.Module, tasks: dict[int, nn.Module], path: str) -> nn.Module:
        """The module to put where ``shared`` (a module of the trunk) is: for the rows of each slot it computes
        what ``tasks[slot]`` (that task's module at the same position) computes, and ``shared`` for the rest."""
        edits = _Edits()
        inner = {}
        for slot, module in tasks.items():
            found = self._peel(shared, module, slot, edits)
            if found is not None and set(found._modules) != set(shared._modules):
                edits.replace[slot] = module
                found = None
            if found is None:
                self.grouped.setdefault(slot, []).append(path or "(root)")
            else:
                inner[slot] = found
        for name, child in list(shared._modules.items()):
            if child is None:
                continue
            sub = {slot: m._modules[name] for slot, m in inner.items() if m._modules[name] is not None}
            new = self.mix(child, sub, f"{path}.{name}" if path else name)
            if new is not child:
                shared._modules[name] = new
        return self._wrap(shared, edits, path)

    def _wrap(self, shared: nn.Module, edits: _Edits, path: str) -> nn.Module:
        m, r = shared, self.routing
        if edits.linear:
            m = _LinearMix(m, r, edits.linear, self.num_slots)
        if edits.norm:
            m = _NormMix(m, r, edits.norm, self.num_slots)
        if edits.prompts:
            m = _PromptedWindows(m, r, edits.prompts)
        if edits.sct_attn:
            m = SCTBlock(m, _PerRow(r, edits.sct_attn), "attn", path)
        if edits.inputs:
            m = _First(_PerRow(r, edits.inputs), m)
        if edits.outputs:
            m = _Then(m, _PerRow(r, edits.outputs))
        if edits.replace:
            m = _Grouped(m, r, edits.replace)
        return m

    def _peel(self, stock: nn.Module, module: nn.Module, slot: int, edits: _Edits) -> nn.Module | None:
        """Record the task's change at this position, peeling the wrappers its method put around the stock module;
        returns the stock-typed module inside (for the children), or None when the slot runs its own module here."""
        while type(module) is not type(stock):
            if isinstance(module, ScaleShift):
                folded = module.folded()
                if _is_linear_op(stock):
                    edits.linear_of(slot, stock).part(slice(None), scale=module.scale, shift=module.shift)
                elif _is_norm(stock):
                    edits.norm[slot] = _norm_params(module.inner, folded["weight"], folded["bias"])
                else:
                    edits.replace[slot] = module
                    return None
                module = module.inner
            elif isinstance(module, AdaptedOutput):
                edits.outputs[slot] = module.adapter
                module = module.inner
            elif isinstance(module, Prompted):
                (edits.outputs if module.layout == "nchw" else edits.inputs)[slot] = module.add_prompt
                module = module.inner
            elif isinstance(module, SCTBlock):
                if module.enabled and module.sct is not None:
                    (edits.sct_attn if module.placement == "attn" else edits.outputs)[slot] = module.sct
                module = module.block
            elif isinstance(module, SCTStage):
                if module.enabled and module.sct is not None:
                    edits.outputs[slot] = module.sct
                module = module.inner
            elif isinstance(module, PromptedWindowAttention):
                edits.prompts[slot] = _prompt_kv(module)
                module = module.inner
            elif isinstance(module, SplitQKV) and isinstance(stock, nn.Linear):
                d = module.fused.out_features // 3
                for i, part in enumerate(getattr(module, p) for p in QKV):
                    if not isinstance(part, FusedSlice) and not self._peft_edit(part, stock, slot, edits,
                                                                                slice(i * d, (i + 1) * d)):
                        edits.replace[slot] = module
                        return None
                module = module.fused
            elif type(module).__module__.startswith("peft.") and hasattr(module, "get_base_layer"):
                if not self._peft_edit(module, stock, slot, edits, slice(None)):
                    edits.replace[slot] = module
                    return None
                module = module.get_base_layer()
            else:
                edits.replace[slot] = module
                return None
        changed = _own_tensors_changed(stock, module)
        if not changed:
            return module
        if _is_linear_op(stock) and changed == ["bias"] and stock.bias is not None:
            edits.linear_of(slot, stock).part(slice(None), shift=(module.bias - stock.bias).detach())
        elif _is_norm(stock):
            edits.norm[slot] = _norm_params(module)
        else:
            edits.replace[slot] = module
            return None
        return module

    def _peft_edit(self, layer: nn.Module, stock: nn.Module, slot: int, edits: _Edits, rows: slice) -> bool:
        """A peft layer (LoRA, DoRA, IA3, LN-tuning) as per-row parts of the frozen op; False if unknown."""
        name = ADAPTER_NAME
        base = layer.get_base_layer()
        if name in getattr(layer, "lora_A", {}):
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            dropout, scaling = layer.lora_dropout[name], layer.scaling[name]
            delta = lambda x, a=lora_a, b=lora_b, d=dropout, s=scaling: b(a(d(x))) * s  # noqa: E731
            if not _is_linear_op(stock):
                return False
            edit = edits.linear_of(slot, stock)
            if layer.use_dora.get(name, False):
                with torch.no_grad():
                    weight = base.weight + layer.get_delta_weight(name)
                    magnitude = layer.lora_magnitude_vector[name].weight.reshape(-1)
                    scale = magnitude / weight.reshape(weight.shape[0], -1).norm(dim=1)
                    shift = base.bias * (1 - scale) if base.bias is not None else None
                edit.part(rows, scale=scale, shift=shift, delta=delta)
            else:
                edit.part(rows, delta=delta)
            return True
        if name in getattr(layer, "ia3_l", {}):
            if not _is_linear_op(stock):
                return False
            vector = layer.ia3_l[name].detach().reshape(-1)
            edit = edits.linear_of(slot, stock)
            if layer.is_feedforward:
                if rows != slice(None):
                    return False
                edit.in_scale = vector
            else:
                edit.part(rows, scale=vector)
            return True
        if name in getattr(layer, "ln_tuning_layers", {}):
            tuned = layer.ln_tuning_layers[name]
            if not (_is_norm(stock) and type(tuned) is type(stock)):
                return False
            edits.norm[slot] = _norm_params(tuned)
            return True
        return False


# ------------------------------------------------------------------------------------------ the model
@dataclass
class TaskInfo:
    """A loaded task: its model (sharing the frozen backbone), its artifact's metadata and how it runs."""

    name: str
    path: str
    model: Method
    meta: dict
    run: str = "shared"  # "shared": in the batch's one pass; "own": a pass of its own
    prompt_tokens: int = 0  # ViT prompt count (rows are grouped by it)
    grouped: list[str] = field(default_factory=list)  # positions where its rows run its own module

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


@dataclass
class MixedLogits:
    """Logits of a mixed batch: row i has ``num_classes[i]`` classes (its task's); ``logits`` is padded to the
    largest with -inf, so ``logits.softmax(-1)`` gives every row its own task's probabilities (0 beyond them)."""

    logits: torch.Tensor  # (B, K_max)
    num_classes: list[int]
    tasks: list[str]

    @property
    def mask(self) -> torch.Tensor:
        """(B, K_max) True where a class exists for the row's task."""
        k = torch.tensor(self.num_classes, device=self.logits.device)
        return torch.arange(self.logits.shape[1], device=self.logits.device) < k[:, None]

    def split(self) -> list[torch.Tensor]:
        """Each row's own logits (K_task,)."""
        return [row[:k] for row, k in zip(self.logits, self.num_classes)]

    def probabilities(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)


class MultiTask(nn.Module):
    """One frozen backbone, many task artifacts on it; ``forward(images, tasks)`` → :class:`MixedLogits`.

    ``artifacts``: artifact folders (task names = folder names), or a mapping name → folder; names are unique. Every artifact must
    have been trained on this backbone's weights (its fingerprint is checked; a mismatch names the artifact).
    Classification artifacts only. Calls are serialised (a lock): one batch at a time; ``add``/``remove`` between
    batches."""

    def __init__(self, backbone: BackboneView, artifacts: Sequence[str | os.PathLike] | Mapping[str, str] = (),
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device)
        self.tasks: dict[str, TaskInfo] = {}
        self.models = nn.ModuleDict()
        self.routing = Routing()
        self._lock = threading.RLock()
        self._tap: list[torch.Tensor | None] | None = None
        items = artifacts.items() if isinstance(artifacts, Mapping) else [(None, a) for a in artifacts]
        for name, path in items:
            self._load(path, name)
        self._rebuild()

    # ---- the task set -----------------------------------------------------------------------
    def add(self, path: str | os.PathLike, name: str | None = None) -> TaskInfo:
        """Load one more artifact (its name: ``name`` or the folder's) and rebuild the trunk."""
        with self._lock:
            info = self._load(path, name)
            try:
                self._rebuild()
            except Exception:
                self._drop(info.name)
                self._rebuild()
                raise
            return info

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.tasks:
                raise VistuneError(f"no task {name!r} is loaded", f"loaded: {', '.join(self.tasks) or '(none)'}")
            self._drop(name)
            self._rebuild()

    def _drop(self, name: str) -> None:
        del self.tasks[name]
        del self.models[_module_key(name)]

    def _load(self, path, name: str | None) -> TaskInfo:
        name = name or Path(path).resolve().name
        if name in self.tasks:
            raise VistuneError(f"a task named {name!r} is already loaded (from {self.tasks[name].path})",
                               "give the new one another name, or remove the old one first")
        meta = read_meta(path)
        if meta.get("task", "classification") != "classification":
            raise VistuneError(f"task {name!r} ({path}) is a {meta['task']} artifact",
                               "MultiTask serves classification artifacts")
        want, have = meta["backbone"]["fingerprint"], self.backbone.fingerprint()
        if want != have:
            raise VistuneError(
                f"task {name!r}: the artifact {path} was trained on backbone {meta['backbone']['name']!r} with "
                f"weights {want[:12]}…, but this MultiTask's backbone {self.backbone.spec.name!r} has weights "
                f"{have[:12]}…", "serve it from a MultiTask on the backbone it was trained on",
            )
        model, meta = load_artifact(path, backbone=self.backbone, device=self.device)
        info = TaskInfo(name, str(path), model.eval(), meta)
        self.tasks[name] = info
        self.models[_module_key(name)] = info.model
        return info

    def _runs_alone(self, model: Method) -> bool:
        """True for a task that cannot share the pass: every backbone weight its own (full fine-tuning), root
        parameters of its own, or a forward / feature function this module does not know."""
        cls = type(model)
        if cls.forward is not Method.forward:
            return True
        if cls.features is not Method.features and not isinstance(model, _KNOWN_FEATURES):
            return True
        shared = {p.data_ptr() for p in self.backbone.model.parameters()}
        if not any(p.data_ptr() in shared for p in model.backbone.model.parameters()):
            return True
        return bool(_own_tensors_changed(self.backbone.model, model.backbone.model))

    def _rebuild(self) -> None:
        slots = list(self.tasks.values())
        trunk = self.backbone.clone_for_tuning(set())
        builder = _Builder(self.routing, len(slots))
        tree = {}
        for slot, info in enumerate(slots):
            info.grouped, info.prompt_tokens = [], 0
            info.run = "own" if self._runs_alone(info.model) else "shared"
            if info.run == "shared":
                tree[slot] = info.model.backbone.model
                if trunk.family == "vit" and isinstance(info.model, VPTShallow):
                    info.prompt_tokens = info.model.prompts[0].shape[0]
                elif isinstance(info.model, PGN):
                    info.prompt_tokens = info.model.config.num_prompts
        with torch.no_grad():
            for name, child in list(trunk.model._modules.items()):
                if child is not None:
                    sub = {s: m._modules[name] for s, m in tree.items()}
                    trunk.model._modules[name] = builder.mix(child, sub, name)
        for slot, positions in builder.grouped.items():
            slots[slot].grouped = positions
        self.trunk = trunk
        self._slots = slots
        self._slot_of = {info.name: i for i, info in enumerate(slots)}
        self._tap = None
        if trunk.family == "vit":  # the block outputs, while a pass mixes VPT-deep with shallow prompts
            for i, block in enumerate(trunk.model.blocks):
                block.register_forward_hook(lambda m, a, out, i=i: self._record(i, out))

    def _record(self, i: int, out: torch.Tensor) -> None:
        if self._tap is not None:
            self._tap[i] = out

    def describe(self) -> list[dict]:
        """How each task runs: in the shared pass or its own, its prompt count, where it is grouped."""
        return [{"task": t.name, "method": t.meta["method"], "run": t.run, "prompt_tokens": t.prompt_tokens,
                 "grouped_positions": len(t.grouped)} for t in self.tasks.values()]

    # ---- the forward ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], tasks: Sequence[str | int] | torch.Tensor
                ) -> MixedLogits:
        """``images``: (B, C, H, W), or B tensors (C, H, W) that may differ in size (each preprocessed for its
        task); ``tasks``: B task names (or slot indices, the order of ``self.tasks``)."""
        with self._lock:
            rows = list(images) if not isinstance(images, torch.Tensor) else images
            slots = self._resolve(tasks, len(rows))
            by_slot: dict[int, list[int]] = {}
            for i, s in enumerate(slots):
                by_slot.setdefault(s, []).append(i)
            logits: dict[int, torch.Tensor] = {}
            groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
            for slot, idx in by_slot.items():
                info = self._slots[slot]
                x = (rows[idx] if isinstance(rows, torch.Tensor) else torch.stack([rows[i] for i in idx]))
                x = x.to(self.device)
                if info.run == "own":
                    logits[slot] = info.model(x)
                    continue
                if isinstance(info.model, VPTPad):
                    x = info.model.prompt(x)
                groups.setdefault((tuple(x.shape[1:]), info.prompt_tokens), []).append((slot, x))
            for (_, tokens), members in groups.items():
                logits.update(self._shared_pass(members, tokens))
            return self._assemble(slots, by_slot, logits)

    def _resolve(self, tasks, n: int) -> list[int]:
        if isinstance(tasks, torch.Tensor):
            tasks = tasks.tolist()
        tasks = list(tasks)
        if len(tasks) != n:
            raise VistuneError(f"MultiTask: {n} images but {len(tasks)} task ids", "give one task per image")
        out = []
        for t in tasks:
            if isinstance(t, str):
                if t not in self._slot_of:
                    raise VistuneError(f"unknown task {t!r}", f"loaded: {', '.join(self._slot_of) or '(none)'}")
                out.append(self._slot_of[t])
            elif not 0 <= int(t) < len(self._slots):
                raise VistuneError(f"task index {t} out of range", f"use 0..{len(self._slots) - 1} or a task name")
            else:
                out.append(int(t))
        return out

    def _shared_pass(self, members: list[tuple[int, torch.Tensor]], tokens: int) -> dict[int, torch.Tensor]:
        """One trunk pass over the rows of several tasks (same input size and prompt count)."""
        segments, start = [], 0
        for slot, x in members:
            segments.append((slot, start, start + x.shape[0]))
            start += x.shape[0]
        x = torch.cat([x for _, x in members])
        with self.routing.rows(segments, x.device):
            if tokens == 0:
                feats = self.trunk.forward_features(x)
            else:
                feats = self._token_pass(x, segments, tokens)
        out = {}
        for slot, s, e in segments:
            model = self._slots[slot].model
            f = feats[s:e]
            if isinstance(model, Sidetune):
                f = model.blend(f, x[s:e])
            out[slot] = model.head(f)
        return out

    def _token_pass(self, x: torch.Tensor, segments, tokens: int) -> torch.Tensor:
        """ViT rows with their own prompts (VPT: the learned ones; PGN: generated from each image)."""
        def first(slot, s, e):
            model = self._slots[slot].model
            return model.prompt_tokens(x[s:e]) if isinstance(model, PGN) else model.prompt_tokens(0, e - s)

        prompts = torch.cat([first(*seg) for seg in segments])
        deep = {slot for slot, _, _ in segments if getattr(self._slots[slot].model, "deep", False)}
        if not deep:
            return self.trunk.forward_tokens(x, prompts)
        n = self.trunk.num_prefix_tokens

        def layer_prompts(i: int) -> torch.Tensor:
            carried = self._tap[i - 1][:, n:n + tokens]  # shallow rows keep the previous block's prompt outputs
            return torch.cat([self._slots[slot].model.prompt_tokens(i, e - s) if slot in deep else carried[s:e]
                              for slot, s, e in segments])

        self._tap = [None] * len(self.trunk.model.blocks)
        try:
            return self.trunk.forward_tokens(x, prompts, layer_prompts)
        finally:
            self._tap = None

    def _assemble(self, slots: list[int], by_slot: dict[int, list[int]], logits: dict[int, torch.Tensor]
                  ) -> MixedLogits:
        k_max = max(self._slots[s].num_classes for s in by_slot) if by_slot else 0
        first = next(iter(logits.values())) if logits else torch.zeros(0)
        out = first.new_full((len(slots), k_max), float("-inf"))
        for slot, idx in by_slot.items():
            out[torch.tensor(idx, device=out.device), :logits[slot].shape[1]] = logits[slot].to(out.dtype)
        return MixedLogits(out, [self._slots[s].num_classes for s in slots], [self._slots[s].name for s in slots])


def _module_key(name: str) -> str:
    """A ModuleDict key for a task name (which may hold dots)."""
    return "task_" + name.encode().hex()
