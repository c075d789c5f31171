"""The ``vistune`` command: one module per group of subcommands, each adding its parsers.

    common     the console, shared argument groups (backbone, data, training), the help formatter
    info       methods, backbones            train      train, calibrate
    inference  eval, predict, export         bench      bench, report
    remap      remap (weight selection, growth)  distill    distill
    misc       data, demo, pretrain          serve      serve
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import VistuneError
from . import bench, distill, inference, info, misc, remap, serve, train
from .common import HelpFormatter, console

__all__ = ["main", "build_parser", "console"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistune", formatter_class=HelpFormatter,
        description="Adapt frozen pretrained vision models (any timm backbone) with parameter-efficient methods.",
        epilog="Start with `vistune demo`, then `vistune methods` and `vistune backbones`. Docs: docs/",
    )
    parser.add_argument("--version", action="version", version=f"vistune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (info, train, inference, remap, distill, misc, bench, serve):
        group.add_parsers(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (not the one at its creation)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _log_to_stderr() -> None:
    """vistune's own log records on stderr as "vistune: …". Only vistune's logger gets the handler: with one
    on the root logger, every library's record (the hub client's retries) printed twice."""
    log = logging.getLogger("vistune")
    log.setLevel(os.environ.get("VISTUNE_LOG", "WARNING").upper())
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("vistune: %(message)s"))
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("train", "distill"):
            raise VistuneError(f"`vistune {args.command}` runs in one process; torchrun started several",
                               "use torchrun only for `vistune train` or `vistune distill` (one data-parallel run); "
                               "run this command without torchrun")
        return args.func(args)
    except VistuneError as e:
        print(f"error: {e.what}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = ""  # bench prints its own message; the other commands write no checkpoint
        if args.command in ("train", "distill") and out:
            hint = f"; continue with the same command plus --resume (checkpoint in {out})"
        elif args.command == "demo":
            hint = "; run the same command again: finished methods are reused, the interrupted one resumes"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
