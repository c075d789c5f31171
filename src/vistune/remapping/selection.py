"""Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024): a smaller model of the same
family takes a subset of a larger pretrained model's weights.

1. **Layer selection** maps each student block to a teacher block, per stage: ``first`` (the paper's choice and
   its official code's: blocks 0..N-1) or ``uniform`` (blocks round(i·(L−1)/(N−1)), first and last kept).
2. **Element selection** picks, along every dimension the student is narrower in, a subset of the teacher's
   indices: ``uniform`` (the paper's default: indices ⌊i·T/S⌋, i.e. every (T/S)-th when it divides) or
   ``consecutive`` (the first S). The indices depend only on the two sizes, so one width — the residual
   stream of a ViT, a CNN stage's channels — gets the same indices in every layer, which the paper shows is
   what matters ("consistency").

Attention is selected head-aware: student head j is a whole teacher head (heads chosen by the element rule)
narrowed to the student's head width by the same rule, in Q, K and V alike, and the output projection reads
those same channels. (The official code applies uniform selection to the fused qkv axis as a flat axis; with
consecutive selection that would take all of Q and part of K, and even uniformly it splices several teacher
heads into one student head.) Kernels, patch sizes and the token grid are kept; the classifier is not selected.
"""
from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import VistuneError
from .families import Family, same_family

LAYER_RULES = ("first", "uniform")
ELEMENT_RULES = ("uniform", "consecutive")


def layer_indices(rule: str, teacher_depth: int, student_depth: int) -> list[int]:
    """Teacher block of each student block within one stage."""
    if rule == "first":
        return list(range(student_depth))
    if student_depth == 1:
        return [0]
    span = teacher_depth - 1
    # round(i·span/(N−1)) with halves rounded up, in integers
    return [(2 * i * span + student_depth - 1) // (2 * (student_depth - 1)) for i in range(student_depth)]


def element_indices(rule: str, teacher_size: int, student_size: int) -> list[int]:
    """Teacher indices kept along one dimension."""
    if rule == "uniform":
        return [i * teacher_size // student_size for i in range(student_size)]
    return list(range(student_size))


def _check_rule(value: str, rules: tuple[str, ...], option: str) -> None:
    if value not in rules:
        raise VistuneError(f"{option} {value!r} is not one of {', '.join(rules)}",
                           f"use {option} {rules[0]} (the paper's choice)")


def _layer_map(family: Family, teacher: nn.Module, student: nn.Module, rule: str) -> dict[tuple[int, int], int]:
    t_stages, s_stages = family.stages(teacher), family.stages(student)
    if len(t_stages) != len(s_stages):
        raise VistuneError(f"the target has {len(s_stages)} stages, the source {len(t_stages)}",
                           "weight selection keeps the number of stages; shrink each stage's depth instead")
    mapping = {}
    for stage, s_blocks in s_stages.items():
        depth_t, depth_s = len(t_stages[stage]), len(s_blocks)
        if depth_s > depth_t:
            where = "" if family.name == "vit" else f"stage {stage} of "
            raise VistuneError(f"{where}the target has {depth_s} blocks, the source only {depth_t}",
                               "weight selection initialises a smaller model; grow a model with --grow")
        for i, t in enumerate(layer_indices(rule, depth_t, depth_s)):
            mapping[(stage, i)] = t
    return mapping


def _attention_overrides(family: Family, teacher: nn.Module, student: nn.Module, rule: str,
                         layer_map: dict) -> dict[str, dict[int, list[int]]]:
    """Head-aware indices for the attention's inner channels of every student block (see module docstring)."""
    overrides: dict[str, dict[int, list[int]]] = {}
    t_blocks = family.stages(teacher)[0]
    for i, s_block in enumerate(family.stages(student)[0]):
        t_block = t_blocks[layer_map[(0, i)]]
        for name, block in (("target", s_block), ("source", t_block)):
            if not (type(block) is Block and type(block.attn) is Attention and type(block.mlp) is Mlp
                    and getattr(block.attn, "gate", None) is None):
                raise VistuneError(
                    f"block {i} of the {name} is {type(block).__name__} with {type(block.attn).__name__}/"
                    f"{type(block.mlp).__name__}: weight selection handles timm's standard ViT Block "
                    "(Attention with fused qkv, ungated; Mlp)",
                    "use a standard timm ViT (default block_fn, attn_layer and mlp_layer)")
        t_attn, s_attn = t_block.attn, s_block.attn
        if s_attn.num_heads > t_attn.num_heads or s_attn.head_dim > t_attn.head_dim:
            raise VistuneError(
                f"block {i}: the target has {s_attn.num_heads} heads of width {s_attn.head_dim}, the source "
                f"{t_attn.num_heads} of width {t_attn.head_dim}; each target head is selected from one source head",
                "give the target at most the source's heads (num_heads) and head width (embed_dim / num_heads)")
        heads = element_indices(rule, t_attn.num_heads, s_attn.num_heads)
        within = element_indices(rule, t_attn.head_dim, s_attn.head_dim)
        inner = [h * t_attn.head_dim + w for h in heads for w in within]
        qkv = [part * t_attn.attn_dim + c for part in range(3) for c in inner]  # timm's layout: (3, heads, head_dim)
        p = family.block_prefix(0, i) + "attn."
        overrides.update({p + "qkv.weight": {0: qkv}, p + "qkv.bias": {0: qkv}, p + "proj.weight": {1: inner},
                          p + "norm.weight": {0: inner}, p + "norm.bias": {0: inner}})
    return overrides


def _check_convs(teacher: nn.Module, student: nn.Module, rename) -> None:
    """Element selection treats a conv's input channels as one width: grouped convs other than depthwise
    would mix groups."""
    t_modules = dict(teacher.named_modules())
    for name, conv in student.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        t_conv = t_modules.get(rename(name + ".weight").removesuffix(".weight"))
        for m, who in ((conv, "target"), (t_conv, "source")):
            if isinstance(m, nn.Conv2d) and m.groups not in (1, m.in_channels):
                raise VistuneError(f"{name} of the {who} is a grouped convolution ({m.groups} groups): weight "
                                   "selection handles dense and depthwise convolutions only",
                                   "use a model without grouped convolutions (e.g. not ResNeXt)")
        if isinstance(t_conv, nn.Conv2d) and (conv.groups == conv.in_channels) != (t_conv.groups == t_conv.in_channels):
            raise VistuneError(f"{name} is depthwise in one model and dense in the other",
                               "select between models of the same block structure")


def _select(t_tensor: torch.Tensor, shape: torch.Size, key: str, rule: str, overrides: dict[int, list[int]],
            fixed: tuple[int, ...]) -> torch.Tensor:
    if t_tensor.dim() != len(shape):
        raise VistuneError(f"{key} is {tuple(shape)} in the target but {tuple(t_tensor.shape)} in the source",
                           "select between models of the same block structure")
    out = t_tensor
    for dim, (t_size, s_size) in enumerate(zip(t_tensor.shape, shape)):
        if dim in overrides:
            index = overrides[dim]
        elif t_size == s_size:
            continue
        elif dim in fixed:
            raise VistuneError(
                f"{key}: {tuple(shape)} in the target vs {tuple(t_tensor.shape)} in the source; weight selection "
                "keeps kernel sizes, patch sizes and the token grid (image size / patch size / prefix tokens)",
                "give the target the source's kernel size, patch_size, img_size and class/register tokens")
        elif s_size > t_size:
            raise VistuneError(
                f"{key}: dimension {dim} is {s_size} in the target but {t_size} in the source; weight selection "
                "only narrows", "make the target no wider than the source (to enlarge a model: --grow)")
        else:
            index = element_indices(rule, t_size, s_size)
        out = out.index_select(dim, torch.tensor(index, dtype=torch.long))
    return out.clone()


def select_weights(teacher: nn.Module, student: nn.Module, *, layers: str = "first",
                   elements: str = "uniform", student_name: str = "model") -> dict[str, torch.Tensor]:
    """The student's state dict, every tensor selected from the teacher's (both headless timm models)."""
    _check_rule(layers, LAYER_RULES, "--layers")
    _check_rule(elements, ELEMENT_RULES, "--elements")
    family = same_family(teacher, student, student_name)
    layer_map = _layer_map(family, teacher, student, layers)

    def rename(key: str) -> str:
        parts = family.split(key)
        if parts is None:
            return key
        stage, index, rest = parts
        return family.block_prefix(stage, layer_map[(stage, index)]) + rest

    _check_convs(teacher, student, rename)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    conv_weights = {n + ".weight" for n, m in student.named_modules() if isinstance(m, nn.Conv2d)}
    if any(k.startswith("attn_pool.") for k in s_state):
        raise VistuneError("the target pools with attention (global_pool='map'), which weight selection does not "
                           "narrow", "use global_pool='token' or 'avg'")
    missing = [k for k in s_state if rename(k) not in t_state]
    if missing:
        raise VistuneError(f"the source has no counterpart of the target's {missing[:4]}: their blocks are built "
                           "differently (e.g. layer scale, register tokens, a downsample only one has)",
                           "select into a target of the source's block structure; only depth and widths may shrink")
    selected, overrides = {}, {}
    # outside the blocks first: a too-wide target is then told so by its embeddings, before any head count
    for key in sorted(s_state, key=lambda k: family.split(k) is not None):
        if family.name == "vit" and not overrides and family.split(key) is not None:
            overrides = _attention_overrides(family, teacher, student, elements, layer_map)
        fixed = (2, 3) if key in conv_weights else (1,) if key == "pos_embed" else ()
        selected[key] = _select(t_state[rename(key)], s_state[key].shape, key, elements, overrides.get(key, {}),
                                fixed)
    return selected
