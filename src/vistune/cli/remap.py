"""``vistune remap``: weight selection into a smaller model, or (``--grow``) function-preserving growth."""
from __future__ import annotations

import argparse

from rich.markup import escape

from ..backbones import load_backbone
from ..errors import VistuneError
from ..remapping import check_out, grow, save_remapped, select
from ..remapping.families import family_of
from ..remapping.selection import ELEMENT_RULES, LAYER_RULES
from ..remapping.spec import SPEC_HELP, format_arch_spec, parse_arch_spec
from .common import HelpFormatter, console

EXAMPLES = """examples:
  # weight selection: a 3-block, D=128, 2-head ViT from vistune's 6-block D=256 one
  vistune remap --from vistune/vit-tiny-cifar10 --to depth=3,embed_dim=128,num_heads=2 --out vit-small.safetensors
  vistune remap --from mobilenetv2_100 --to mobilenetv2_050 --out mnv2-050.safetensors
  # growth: 8 blocks and a 3x MLP that compute the 6-block model's features exactly
  vistune remap --grow --from vistune/vit-tiny-cifar10 --depth 8 --mlp-ratio 3 --out vit-deeper.safetensors
  vistune remap --grow --from tf_efficientnet_lite0 --to tf_efficientnet_lite1 --out lite0-deeper.safetensors
  # then, as any local checkpoint (its architecture options and preprocessing are in the file)
  vistune train --backbone vit_small_patch16_224 --checkpoint vit-small.safetensors --method linear --data digits
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The examples keep their lines; every option still shows its real default."""


def add_parsers(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "remap", help="weight selection into a smaller model, or function-preserving growth (--grow)",
        description="Remapping tuning. Without --grow: initialise a smaller model of the source's family by "
                    "weight selection (Xu et al. 2024). With --grow: a deeper model / wider ViT MLP that computes "
                    "the source's features exactly at initialisation (Net2Net). Writes a .safetensors checkpoint "
                    "that `vistune train --backbone ARCH --checkpoint FILE` loads.",
        epilog=EXAMPLES, formatter_class=_Formatter)
    p.add_argument("--from", dest="source", required=True, metavar="BACKBONE",
                   help="the pretrained source: a timm name, an offline or vistune backbone (`vistune backbones`)")
    p.add_argument("--checkpoint", metavar="FILE", help="local weights of --from (.safetensors/.pth/.npz)")
    p.add_argument("--to", metavar="ARCH_SPEC", help=f"the target model: {SPEC_HELP}")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--layers", choices=LAYER_RULES,
                   help="weight selection: which source blocks (per stage) the target's come from: first N "
                        "(default, the paper's) or evenly spaced")
    p.add_argument("--elements", choices=ELEMENT_RULES,
                   help="weight selection: which indices of each narrowed width: every (T/S)-th (uniform, default, "
                        "the paper's) or the first S (consecutive)")
    p.add_argument("--grow", action="store_true", help="grow the source instead (function-preserving)")
    p.add_argument("--depth", metavar="N|N1,N2,..",
                   help="--grow: the new depth (ViT: blocks; ConvNeXt/ResNet: blocks per stage, comma-separated)")
    p.add_argument("--mlp-ratio", type=float, metavar="R", help="--grow: the new ViT MLP ratio (hidden = R·D)")
    p.add_argument("--seed", type=int, default=0, help="--grow: seed of the widening and of fresh blocks")
    p.set_defaults(func=cmd_remap)
    return p


def _check_flags(args) -> None:
    check_out(args.out, args.overwrite)
    if args.grow:
        used = [f for f, v in (("--layers", args.layers), ("--elements", args.elements)) if v is not None]
        if used:
            raise VistuneError(f"{', '.join(used)}: weight-selection options, not growth ones",
                               "drop them, or drop --grow to select weights")
        if args.to is None and args.depth is None and args.mlp_ratio is None:
            raise VistuneError("--grow: nothing to grow", "give --depth, --mlp-ratio or --to ARCH_SPEC")
    else:
        used = [f for f, v in (("--depth", args.depth), ("--mlp-ratio", args.mlp_ratio)) if v is not None]
        if used:
            raise VistuneError(f"{', '.join(used)} only with --grow",
                               "add --grow, or give the smaller target as --to ARCH_SPEC (e.g. --to depth=3)")
        if args.to is None:
            raise VistuneError("weight selection needs the target model", f"give --to {SPEC_HELP}")


def _depth_option(family, model, text: str) -> tuple[str, object]:
    """--depth as the family's timm option: ViT depth=N, ConvNeXt depths=[...], ResNet layers=[...]."""
    stages = family.stages(model)
    now = ",".join(str(len(b)) for b in stages.values())
    if family.depth_option is None:
        raise VistuneError(
            "--depth: timm builds EfficientNet/MobileNet depths from the architecture's name, not from an option",
            "grow into a deeper architecture of the same widths with --to, e.g. tf_efficientnet_lite0 → "
            "--to tf_efficientnet_lite1, efficientnet_b0 → --to efficientnet_b1")
    try:
        depths = [int(v) for v in text.split(",")]
    except ValueError:
        depths = []
    if family.name == "vit":
        if len(depths) != 1:
            raise VistuneError(f"--depth {text!r}: a ViT's depth is one number of blocks (now {now})",
                               f"e.g. --depth {int(now) + 2}")
        return family.depth_option, depths[0]
    if len(depths) != len(stages):
        raise VistuneError(f"--depth {text!r}: this {family.name} has {len(stages)} stages (now {now})",
                           f"give one depth per stage, e.g. --depth {now}")
    return family.depth_option, depths


def cmd_remap(args) -> int:
    _check_flags(args)
    spec = parse_arch_spec(args.to) if args.to is not None else None
    source = load_backbone(args.source, checkpoint=args.checkpoint)
    base = (source.spec.architecture, dict(source.spec.model_kwargs))
    architecture, options = spec.resolve(*base) if spec is not None else base
    if args.grow:
        family = family_of(source.model, f"--from {args.source}")
        if args.depth is not None:
            key, value = _depth_option(family, source.model, args.depth)
            options[key] = value
        if args.mlp_ratio is not None:
            if family.name != "vit":
                raise VistuneError(f"--mlp-ratio: {args.source} is a {family.name}, whose MLP width timm does not "
                                   "expose as an option", "widen ViT MLPs only; grow CNNs with --depth")
            options["mlp_ratio"] = args.mlp_ratio
        model = grow(source, architecture, options, seed=args.seed)
        how = {"method": "net2net-growth", "seed": args.seed}
    else:
        layers, elements = args.layers or LAYER_RULES[0], args.elements or ELEMENT_RULES[0]
        model = select(source, architecture, options, layers=layers, elements=elements)
        how = {"method": "weight-selection", "layers": layers, "elements": elements}
    save_remapped(args.out, model, architecture=architecture, options=options, source=source, how=how,
                  overwrite=args.overwrite)
    n_source = sum(p.numel() for p in source.model.parameters())
    n_target = sum(p.numel() for p in model.parameters())
    done = "grown (features identical at initialisation)" if args.grow else f"weight selection ({how['layers']} " \
        f"layers, {how['elements']} elements)"
    console.print(escape(f"{args.source} ({n_source:,} params) → {format_arch_spec(architecture, options)} "
                         f"({n_target:,} params): {done}"))
    console.print(escape(f"wrote {args.out}; use it with: vistune train --backbone {architecture} "
                         f"--checkpoint {args.out} …"))
    return 0
