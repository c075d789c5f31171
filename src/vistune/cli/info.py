"""`vistune methods` and `vistune backbones`: what the registry and the offline backbones hold."""
from __future__ import annotations

from rich.table import Table

from ..output import print_table
from .common import console, subparser


def _ordered():
    from ..methods import CATEGORIES, METHODS

    return sorted(METHODS.values(), key=lambda i: (CATEGORIES.index(i.category), i.name))


def training_defaults(info) -> str:
    """The optimizer, base lr and warm-up a method trains with when the command line does not say."""
    from ..training import TrainConfig

    cls = info.method_class
    opt = cls.default_optimizer
    lr = TrainConfig().default_lr(cls)
    own = "".join(f"; {lrs[opt]:g} on {'CNNs (the generic view)' if family == 'generic' else f'{family} backbones'}"
                  for family, lrs in cls.default_lrs_by_family.items() if opt in lrs)
    return f"{opt}, base lr {lr:g}{own} (× batch/256), warm-up {cls.default_warmup_fraction:.0%} of epochs"


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
    print_table(console, table)
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
            print_table(console, t)
        for proc in _procedures():
            if proc.config_class is None:
                console.print(f"{proc.name}: options are the flags of `{proc.command} --help`")
                continue
            t = Table(title=f"{proc.name} options (flags of `{proc.command}`; a bench suite's [{proc.name}] table)")
            for col in ("key", "type", "default", "help"):
                t.add_column(col)
            for key, (tp, default, text) in proc.config_class.fields_help().items():
                t.add_row(key, tp, repr(default), text)
            print_table(console, t)
    else:
        console.print("Options and training defaults of each method: vistune methods --details")
    console.print("procedure: a training procedure of the remapping family around a method (the student / remapped "
                  "model is adapted by any method above; the result is that method's artifact)")
    return 0


# what `backbones --all` adapts each method with: small settings that keep the check cheap and need no
# download (a random-init side network); whether a method applies does not depend on them
SUPPORT_OVERRIDES = {"sidetune": {"side_network": "test_efficientnet", "side_pretrained": False},
                     "vpt-shallow": {"num_tokens": 3}, "vpt-deep": {"num_tokens": 3, "project_dim": 8},
                     "pgn": {"num_prompts": 3, "library_size": 8, "generator_width": 4},
                     "partial": {"k": 1}, "mlp": {"k": 2}, "fact-tk": {"rank": 4},
                     "e2vpt": {"num_prompts": 3, "num_kv": 2}, "fourierft": {"n_frequency": 64}}


FAILS = "FAILS (a bug, not a refusal) — "


def _mark(reason: str | None) -> str:
    return "✓" if reason is None else "✗" if reason.startswith(FAILS) else "–"


def support_matrix(progress: bool = True) -> dict[str, dict[str, str | None]]:
    """family → method → None (it applies) or the first line of its refusal, for one tiny random-weight model of
    each timm family (backbones/catalog.py): every method is attached with ``adapt``, as a user's run would."""
    import logging

    from tqdm.auto import tqdm

    from ..backbones import load_backbone
    from ..backbones.catalog import SLOW_FAMILIES, TIMM_FAMILIES
    from ..errors import VistuneError
    from ..methods import METHODS, adapt, make_config

    matrix: dict[str, dict[str, str | None]] = {}
    families = {**TIMM_FAMILIES, **SLOW_FAMILIES}
    quiet = logging.getLogger("vistune")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the random-init notice, once per family otherwise
    try:
        for family, cfg in tqdm(families.items(), desc="timm families", disable=not progress):
            backbone = load_backbone(cfg.architecture, random_init=True, model_kwargs=cfg.model_kwargs)
            row = matrix[family] = {}
            for name in sorted(METHODS):
                try:
                    config = make_config(name, SUPPORT_OVERRIDES.get(name), image_size=cfg.image_size)
                    adapt(backbone, config, num_classes=3)
                    row[name] = None
                except VistuneError as e:
                    row[name] = e.args[0] if e.args else str(e)
                except Exception as e:  # a bug, not a refusal: the table shows it as such (✗)
                    row[name] = f"{FAILS}{type(e).__name__}: {e}"
    finally:
        quiet.setLevel(level)
    return matrix


def support_markdown(matrix: dict[str, dict[str, str | None]]) -> str:
    """The families × methods table of docs/backbones.md (✓ applies, – refuses with a VistuneError, ✗ fails with
    another exception: a bug), then the reasons."""
    from ..backbones.catalog import SLOW_FAMILIES, TIMM_FAMILIES
    from ..methods import METHODS

    names = sorted(METHODS)
    families = {**TIMM_FAMILIES, **SLOW_FAMILIES}
    rows = ["| family | timm architecture (tiny) | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---|---|" + "---|" * len(names)]
    for family, row in matrix.items():
        cfg = families[family]
        cells = " | ".join(_mark(row[n]) for n in names)
        rows.append(f"| `{family}` | `{cfg.architecture}`{' (slow)' if family in SLOW_FAMILIES else ''} | {cells} |")
    table = "\n".join(rows)
    refusals = "\n".join(f"- `{family}` × `{name}`: {row[name]}" for family, row in matrix.items() for name in names
                         if row[name] is not None and (not METHODS[name].needs or row[name].startswith(FAILS)))
    return table + ("\n\nWhere a method that needs no family view refuses (or a cell fails), it says why:\n\n" + refusals
                    if refusals else "")


def cmd_backbones(args) -> int:
    from ..backbones import OFFLINE_BACKBONES, packaged_backbones

    if args.all:
        matrix = support_matrix(progress=not args.markdown)
        if args.markdown:
            print("<!-- support-table:start -->")
            print(support_markdown(matrix))
            print("<!-- support-table:end -->")
            return 0
        from ..methods import METHODS

        names = sorted(METHODS)
        table = Table(title="Which method runs on which timm family (✓; – refuses with a reason; ✗ fails: a bug)")
        table.add_column("family", no_wrap=True)
        for n in names:
            table.add_column(n)
        for family, row in matrix.items():
            table.add_row(family, *(_mark(row[n]) for n in names))
        console.print(table)
        console.print("Every other timm model gets the generic view too; the reasons of each refusal: "
                      "vistune backbones --all --markdown (docs/backbones.md)")
        return 0

    table = Table(title="Offline backbones (no network needed)")
    for col in ("name", "timm architecture", "weights", "installed", "description"):
        table.add_column(col, no_wrap=col == "name")
    for name, card in sorted(packaged_backbones().items()):
        table.add_row(name, card["architecture"], "inside vistune (see its model card)", "yes", card["description"])
    for b in OFFLINE_BACKBONES.values():
        table.add_row(b.name, b.architecture, f"PyPI {b.package}", "yes" if b.available() else f"no: {b.install}",
                      b.description)
    print_table(console, table)
    console.print(
        "Any timm model name also works when online, e.g. vit_base_patch16_224.orig_in21k "
        "(the VPT paper's backbone), vit_small_patch14_dinov2.lvd142m, swin_tiny_patch4_window7_224, "
        "convnext_tiny.\n"
        "Local weights: --backbone <timm architecture> --checkpoint FILE (.safetensors/.pth/.npz).\n"
        "Random weights for shape checks: --backbone <timm architecture> --random-init.\n"
        "Any timm model gets the generic view (module tuners, heads, pad prompts, side-tuning); family views add the "
        "token sequence for VPT/PGN: vit (VisionTransformer & kin), eva, beit, swin, swinv2. Which method runs on "
        "which timm family: vistune backbones --all. List timm names with: "
        "python -c \"import timm; print(timm.list_models('vit_*'))\""
    )
    return 0


def add_parsers(sub) -> None:
    p = subparser(sub, "methods", help="list the registered methods")
    p.add_argument("--details", action="store_true", help="also list each method's options and training defaults")
    p.add_argument("--markdown", action="store_true", help="print the methods table as Markdown (README's table)")
    p.set_defaults(func=cmd_methods)

    p = subparser(sub, "backbones", help="list offline backbones and how to name any timm model")
    p.add_argument("--all", action="store_true",
                   help="attach every method to a tiny random-weight model of each timm family and table which "
                        "apply (a few minutes on a CPU)")
    p.add_argument("--markdown", action="store_true", help="with --all: print the table as Markdown (docs/backbones.md)")
    p.set_defaults(func=cmd_backbones)
