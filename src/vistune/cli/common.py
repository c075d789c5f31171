"""What the subcommands share: the console, argument groups declared once, and small helpers."""
from __future__ import annotations

import argparse
import textwrap

from ..output import OutputConsole, bars_shown, epoch_printer

console = OutputConsole()  # reads no markup: every path, class and data name prints as written


class HelpFormatter(argparse.HelpFormatter):
    """Help with each option's real default: argparse's "(default: X)" is added only where the help text does
    not already say what the default is, and never for flags or unset defaults (None, False, an empty list).
    Lines break between words only: a path, a comma list or a hyphenated word is never split."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default is None or action.default is False \
                or action.default in ([], ()) or action.default == argparse.SUPPRESS:
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_long_words=False, break_on_hyphens=False)


def subparser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def method_options(pairs: list[str], method: str) -> dict[str, str]:
    """`vistune train`'s ``--set [METHOD.]KEY=VALUE`` pairs → {key: value} for ``method`` (values stay strings;
    the method's config types them). The grammar is the one `vistune bench` uses (vistune.options)."""
    from ..options import parse_sets

    return parse_sets(pairs, [method], methods_flag="--method").for_method(method)


def notify(line: str) -> None:
    """A line about the job for the user (its data, a carved val split, missing classes, an epoch)."""
    console.print(line, highlight=False, soft_wrap=True)


def epoch_lines(progress: bool, prefix: str = ""):
    """The trainer's ``on_epoch`` for a command whose progress bars do not show (its stderr is no terminal:
    CI logs, ``2>&1 | tee``): a line per epoch instead. None where the bars show or with --quiet."""
    return epoch_printer(notify, prefix) if progress and not bars_shown() else None


# ---- argument groups -----------------------------------------------------------------------
def add_backbone_args(p: argparse.ArgumentParser, required: bool = True, flag: str = "--backbone") -> None:
    """The backbone options; ``flag``: its name (`vistune distill` calls it --student; the value is args.backbone)."""
    p.add_argument(flag, required=required, metavar="B", dest="backbone",
                   help="timm model name, offline backbone (see `vistune backbones`), or timm architecture "
                        "with --checkpoint/--random-init")
    p.add_argument("--checkpoint", metavar="FILE", help="local backbone weights (.safetensors/.pth/.npz)")
    p.add_argument("--random-init", action="store_true",
                   help="random backbone weights (shape checks and tests only; never silently)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data set and how its splits are drawn (the same for `train` and `calibrate`)."""
    p.add_argument("--data", required=True, metavar="D",
                   help="image folder (train/<class>/…, optional val/ and test/), VTAB-1k list-file folder, or "
                        "built-in: fashion-mnist, mnist5k, digits, cifar10:<path>, shapes-loc, shapes-ori, "
                        "clevr-count")
    p.add_argument("--train-size", type=int, metavar="N",
                   help="stratified N-image subset of train (VTAB-1k: 800; default: all)")
    p.add_argument("--val-size", type=int, metavar="N",
                   help="stratified N-image subset of val (VTAB-1k: 200; default: all, or 20%% of train when "
                        "there is no val split)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="input size in pixels (default: the backbone's pretrained size)")
    p.add_argument("--normalization", choices=["pretrained_cfg", "paper"], default="pretrained_cfg",
                   help="mean/std of the backbone's pretrained_cfg, or ImageNet's as the VPT/SCT papers")
    p.add_argument("--data-seed", type=int, default=0, metavar="N",
                   help="seed of the val split carved from train (when there is no val/) and of the subsets; "
                        "independent of --seed")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training recipe (vistune.training.TrainConfig)."""
    p.add_argument("--epochs", type=int, default=10, metavar="N", help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per step (the lr is scaled by batch/256)")
    p.add_argument("--lr", type=lr_value, default=None, metavar="LR|auto",
                   help="base lr, scaled by batch/256 (default: the method's, measured in docs/defaults.md; "
                        "`vistune methods --details` lists them); auto: a short val-based search around that "
                        "default first, printed and stored in metrics.json")
    p.add_argument("--weight-decay", type=float, default=0.0, metavar="WD",
                   help="weight decay (never on biases and norm parameters)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="default: the method's (SGD momentum 0.9 or AdamW: `vistune methods --details` says which)")
    p.add_argument("--warmup-epochs", type=int, default=None, metavar="N",
                   help="linear warm-up epochs before the cosine schedule (default: 10%% of --epochs)")
    p.add_argument("--label-smoothing", type=float, default=0.0, metavar="S", help="label smoothing of the loss")
    p.add_argument("--select", choices=["best-val", "last"], default="best-val",
                   help="which epoch's weights to keep (never selected on test)")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the method's initialisation, shuffling and dropout (the data: --data-seed)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU where it is slower)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader worker processes")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward: less memory, more time per step "
                        "(same gradients; a runtime setting, not saved)")


def lr_value(text: str):
    """``--lr``: a positive number or ``auto``."""
    if text == "auto":
        return "auto"
    try:
        return float(text)  # its range: TrainConfig's check, whose error says the fix
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def train_config(args):
    """The TrainConfig of parsed `add_train_args` options."""
    from ..training import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        select=args.select, seed=args.seed, device=args.device, amp=args.amp, num_workers=args.workers,
        grad_checkpoint=args.grad_checkpoint,
    )
