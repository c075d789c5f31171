"""``vistune bench`` and ``vistune report`` (their arguments are declared in ``vistune/cli.py``): the flags of
``vistune bench`` become a :class:`~vistune.bench.sweep.BenchOptions`."""
from __future__ import annotations

import sys

from ..errors import VistuneError


def _numbers(text: str | None, flag: str, kind: type, example: str) -> list | None:
    """A comma-separated list of ``kind`` (float or int) from a flag, or None when not given."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        what = "numbers" if kind is float else "integers"
        raise VistuneError(f"{flag} {text!r} is not a comma-separated list of {what}",
                           f"write e.g. {flag} {example}") from None
    if not values:
        raise VistuneError(f"{flag} is empty", f"write e.g. {flag} {example}")
    return values


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def cmd_bench(args) -> int:
    from ..output import OutputConsole
    from .ray_executor import RayOptions
    from .sweep import BenchOptions, command_line, run_bench

    console = OutputConsole(quiet=args.quiet)
    ray_flags = [f for f, v in (("--ray-address", args.ray_address), ("--gpus-per-run", args.gpus_per_run),
                                ("--cpus-per-run", args.cpus_per_run != 1.0)) if v]
    if ray_flags and args.executor != "ray":
        raise VistuneError(f"{', '.join(ray_flags)} only applies to runs on Ray", "add --executor ray")
    options = BenchOptions(
        args.suite, _names(args.methods) or [], args.backbone, args.out, data_root=args.data_root,
        epochs=args.epochs, lr_grid=_numbers(args.lr_grid, "--lr-grid", float, "0.25,0.5,1"),
        wd_grid=_numbers(args.wd_grid, "--wd-grid", float, "0,1e-4"),
        seeds=_numbers(args.seeds, "--seeds", int, "42,44,82"), tasks=_names(args.tasks), device=args.device,
        image_size=args.image_size, batch_size=args.batch_size, test_size=args.test_size, sets=args.set,
        checkpoint=args.checkpoint, random_init=args.random_init, progress=not args.quiet, command=command_line(),
        executor=args.executor,
        ray=RayOptions(address=args.ray_address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run),
        efficiency=not args.no_efficiency, teacher=args.teacher,
    )
    try:
        summary = run_bench(options, console=console)
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
