"""``vistune bench`` and ``vistune report`` (their arguments are declared in ``vistune/cli.py``)."""
from __future__ import annotations

import sys

from ..errors import VistuneError


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VistuneError(f"{flag} {text!r} is not a comma-separated list of numbers",
                           f"write e.g. {flag} 0.25,0.5,1") from None
    if not values:
        raise VistuneError(f"{flag} is empty", f"write e.g. {flag} 0.25,0.5,1")
    return values


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VistuneError(f"{flag} {text!r} is not a comma-separated list of integers",
                           f"write e.g. {flag} 42,44,82") from None
    if not values:
        raise VistuneError(f"{flag} is empty", f"write e.g. {flag} 42,44")
    return values


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def cmd_bench(args) -> int:
    from rich.console import Console

    from .sweep import command_line, run_bench

    console = Console(quiet=args.quiet)
    try:
        summary = run_bench(
            args.suite, _names(args.methods) or [], args.backbone, args.out, data_root=args.data_root,
            epochs=args.epochs, lr_grid=_floats(args.lr_grid, "--lr-grid"), wd_grid=_floats(args.wd_grid, "--wd-grid"),
            seeds=_ints(args.seeds, "--seeds"), tasks=_names(args.tasks), device=args.device,
            image_size=args.image_size, batch_size=args.batch_size, test_size=args.test_size, sets=args.set,
            checkpoint=args.checkpoint, random_init=args.random_init, progress=not args.quiet, console=console,
            command=command_line(),
        )
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are stored in {args.out}/results.sqlite; run the same command "
              "again to continue (nothing finished is redone)", file=sys.stderr)
        return 130
    console.print(f"done: {summary['executed']} run(s) executed, {summary['already_stored']} already stored "
                  f"({summary['planned']} planned)")
    return 0


def cmd_report(args) -> int:
    from .report import PLOT, write_report

    path = write_report(args.dir, args.out)
    print(f"wrote {path} and {args.dir.rstrip('/')}/{PLOT}")
    return 0
