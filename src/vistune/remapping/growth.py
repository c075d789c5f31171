"""Architecture remapping by function-preserving growth (Net2Net, Chen et al., ICLR 2016).

* **Deeper** (Net2DeeperNet): k new blocks go into a stage of L blocks after blocks ⌈(j+1)·L/k⌉−1, j < k
  (spread evenly; one new block goes last). A new block starts as a copy of the block before it (or with
  timm's fresh init where that block's shapes differ, e.g. a CNN stage's strided first block) and the last
  layer of each of its residual branches is zeroed, so it computes the identity: ViT attn.proj and mlp.fc2,
  ConvNeXt mlp.fc2, EfficientNet/MobileNet InvertedResidual bn3 and DepthwiseSeparable bn2 (blocks with a skip),
  ResNet BasicBlock bn2 / Bottleneck bn3 (weight and bias; exact because the block's input is the previous
  block's ReLU output, ≥ 0). Blocks whose shortcut is not the identity, or whose branch ends otherwise, are refused.
* **Wider MLP** (Net2WiderNet, ViT): new hidden units of fc1 replicate existing ones (a seeded random choice
  without repeats while it lasts) and each original unit's fc2 column is split among its replicas in random
  positive shares summing to one. The output is unchanged, and, unlike Net2Net's equal split plus noise, the
  replicas receive different gradients from the first step while the function stays exact.

Everything else (stem, embeddings, channel widths) must match: growth only adds blocks and MLP units.
"""
from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from timm.models.convnext import ConvNeXtBlock
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual  # (no public re-export)
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import VistuneError
from .families import Family, same_family

_KEEP = "growth changes only the depth (and a ViT's mlp_ratio); keep every other option of the source"


def insertion_plan(source_depth: int, target_depth: int) -> list[tuple[int, bool]]:
    """For each target block of a stage: (source block it comes from, whether it is new)."""
    new = target_depth - source_depth
    after = [math.ceil((j + 1) * source_depth / new) - 1 for j in range(new)] if new else []
    plan = []
    for i in range(source_depth):
        plan.append((i, False))
        plan.extend((i, True) for p in after if p == i)
    return plan


def identity_outputs(block: nn.Module, where: str) -> list[str]:
    """Modules whose weight and bias, zeroed, make ``block`` compute the identity (last layer of each residual
    branch); a VistuneError for block types where that does not hold."""
    if type(block) is Block:
        return ["attn.proj", "mlp.fc2"]
    if isinstance(block, ConvNeXtBlock) and isinstance(block.shortcut, nn.Identity):
        return ["mlp.fc2"]
    if type(block) is InvertedResidual and block.has_skip:  # not CondConv's subclass
        return ["bn3"]
    if type(block) is DepthwiseSeparableConv and block.has_skip:
        return ["bn2"]
    if isinstance(block, BasicBlock) and block.downsample is None and isinstance(block.act2, nn.ReLU):
        return ["bn2"]
    if isinstance(block, Bottleneck) and block.downsample is None and isinstance(block.act3, nn.ReLU):
        return ["bn3"]
    raise VistuneError(
        f"{where} would be a new {type(block).__name__}, which cannot start as the identity (supported: timm's "
        "ViT Block, ConvNeXtBlock, InvertedResidual/DepthwiseSeparableConv with a skip, ResNet blocks with an "
        "identity shortcut and ReLU)", "grow a stage whose added blocks keep the width and stride")


def _widen(fc1_w, fc1_b, fc2_w, hidden: int, gen: torch.Generator):
    """Net2WiderNet on one MLP: (fc1 weight, fc1 bias, fc2 weight) with ``hidden`` units, same function."""
    old = fc1_w.shape[0]
    extra = hidden - old
    repeats = torch.cat([torch.randperm(old, generator=gen) for _ in range(math.ceil(extra / old))])[:extra]
    source_unit = torch.cat([torch.arange(old), repeats])
    raw = 0.5 + torch.rand(hidden, generator=gen, dtype=torch.float64)
    total = torch.zeros(old, dtype=torch.float64).index_add_(0, source_unit, raw)
    share = (raw / total[source_unit]).to(fc2_w.dtype)
    fc2 = fc2_w[:, source_unit] * share
    return fc1_w[source_unit].clone(), None if fc1_b is None else fc1_b[source_unit].clone(), fc2


def _block_state(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _check_widening(family: Family, s_block: nn.Module, t_block: nn.Module, where: str) -> bool:
    """Whether the block's MLP grows; refuses MLPs whose hidden layer Net2WiderNet cannot replicate exactly."""
    s_mlp, t_mlp = getattr(s_block, "mlp", None), getattr(t_block, "mlp", None)
    if not isinstance(s_mlp, nn.Module) or not hasattr(s_mlp, "fc1"):
        return False
    grows = t_mlp.fc1.weight.shape[0] != s_mlp.fc1.weight.shape[0]
    if grows and (family.name != "vit" or type(s_mlp) is not Mlp or not isinstance(s_mlp.norm, nn.Identity)):
        raise VistuneError(f"{where}: widening the MLP is done for timm's ViT Mlp without a hidden norm; this is a "
                           f"{family.name} {type(s_mlp).__name__}", "keep the MLP width (mlp_ratio) of the source")
    if t_mlp.fc1.weight.shape[0] < s_mlp.fc1.weight.shape[0]:
        raise VistuneError(f"{where}: the target's MLP is narrower than the source's",
                           "growth only widens; to shrink use weight selection (without --grow)")
    return grows


def grow_weights(source: nn.Module, target: nn.Module, *, seed: int = 0,
                 target_name: str = "model") -> dict[str, torch.Tensor]:
    """The target's state dict: the source's function in a deeper / wider model of the same timm class.

    ``target`` supplies the shapes and the fresh init of new blocks that cannot copy their neighbour."""
    family = same_family(source, target, target_name)
    s_stages, t_stages = family.stages(source), family.stages(target)
    if len(s_stages) != len(t_stages):
        raise VistuneError(f"the target has {len(t_stages)} stages, the source {len(s_stages)}",
                           "growth keeps the stages and adds blocks within them")
    s_state, t_state = source.state_dict(), target.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, t_tensor in t_state.items():  # stem, embeddings, final norms: kept as they are
        if family.split(key) is not None:
            continue
        if key not in s_state or s_state[key].shape != t_tensor.shape:
            found = "missing" if key not in s_state else tuple(s_state[key].shape)
            raise VistuneError(f"{key} is {tuple(t_tensor.shape)} in the target but {found} in the source", _KEEP)
        out[key] = s_state[key].clone()
    for stage, t_blocks in t_stages.items():
        if len(t_blocks) < len(s_stages[stage]):
            where = "" if family.name == "vit" else f"stage {stage}: "
            raise VistuneError(f"{where}the target has {len(t_blocks)} blocks, the source {len(s_stages[stage])}",
                               "growth only adds blocks; to shrink use weight selection (without --grow)")
        for t_index, (s_index, new) in enumerate(insertion_plan(len(s_stages[stage]), len(t_blocks))):
            where = family.block_prefix(stage, t_index).rstrip(".")
            t_block, s_block = t_blocks[t_index], s_stages[stage][s_index]
            zeroed = identity_outputs(t_block, where) if new else []
            grows = _check_widening(family, s_block, t_block, where)
            t_prefix, s_prefix = family.block_prefix(stage, t_index), family.block_prefix(stage, s_index)
            mine, theirs = _block_state(t_state, t_prefix), _block_state(s_state, s_prefix)
            if grows:
                hidden = t_block.mlp.fc1.weight.shape[0]
                w1, b1, w2 = _widen(theirs["mlp.fc1.weight"], theirs.get("mlp.fc1.bias"),
                                    theirs["mlp.fc2.weight"], hidden, gen)
                theirs = {**theirs, "mlp.fc1.weight": w1, "mlp.fc2.weight": w2,
                          **({} if b1 is None else {"mlp.fc1.bias": b1})}
            fits = mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)
            if not fits and not new:
                bad = sorted(k for k in mine if k not in theirs or mine[k].shape != theirs[k].shape)[:3]
                raise VistuneError(f"{where}: {bad} differ between source and target", _KEEP)
            block = {k: v.clone() for k, v in (theirs if fits else mine).items()}
            for name in zeroed:
                for k in (f"{name}.weight", f"{name}.bias"):
                    if k in block:
                        block[k] = torch.zeros_like(block[k])
            out.update({t_prefix + k: v for k, v in block.items()})
    return out
