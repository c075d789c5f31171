"""What vistune prints for a person: the console every command writes through, and the progress lines shown
where no progress bar can be (output into a pipe, a file, CI logs).

The console reads no markup: paths, class names, task names and suite descriptions are printed as written
(``[test]`` stays, a class named ``[/x]`` cannot break a line); styles are given as rich ``style=`` / ``Text``.
Not a terminal: lines are not wrapped and tables are not cut (each takes its natural width), unless ``COLUMNS``
sets a width. A table that a terminal cannot hold without cutting words (:func:`print_table`) is printed as
plain lines, one per cell, so that no name, path or number is cut to "…".
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.console import Console, ConsoleDimensions
from rich.measure import Measurement
from rich.table import Table

UNWRAPPED_WIDTH = 10_000  # "as wide as the text": no log line or table column is cut
HEARTBEAT_SECONDS = 60.0  # a line at most this often while one long bench run has no bar to show


class OutputConsole(Console):
    """A rich Console that reads no markup and, where it writes to no terminal, wraps and cuts nothing."""

    def __init__(self, **kwargs):
        kwargs.setdefault("markup", False)
        super().__init__(**kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


def print_table(console: Console, table: Table) -> None:
    """The table where it fits the console's width with its words whole (cells may wrap between words); else
    its title, then per row the first cell and "header: value" lines for the others (a table without header:
    "first cell: other cells")."""
    narrowest = Measurement.get(console, console.options.update(width=UNWRAPPED_WIDTH), table).minimum
    if narrowest <= console.width:
        console.print(table)
        return

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    if table.title:
        say(str(table.title))
    headers = [str(c.header) for c in table.columns]
    for row in zip(*(list(c.cells) for c in table.columns)):
        if not table.show_header:
            say(f"  {row[0]}: " + " · ".join(str(v) for v in row[1:]))
            continue
        say(f"- {row[0]}")
        for header, value in zip(headers[1:], row[1:]):
            say(f"    {header}: {value}")
    if table.caption:
        say(str(table.caption))


def bars_shown() -> bool:
    """Whether tqdm draws its progress bars: tqdm's ``disable=None`` draws them only on a terminal (stderr)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def epoch_line(record: dict, epochs: int, prefix: str = "") -> str:
    """One line per finished epoch, from the trainer's history record."""
    val = f"val mIoU {record['val_miou']:.4f}" if record.get("val_miou") is not None else \
        f"val acc {record['val_accuracy']:.4f}"
    return (f"{prefix}epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f}, {val} "
            f"({record['seconds']:.1f} s)")


def epoch_printer(print_line: Callable[[str], None], prefix: str = "") -> Callable[[dict, int], None]:
    """An ``on_epoch(record, epochs)`` callback of the trainer that prints :func:`epoch_line`."""
    return lambda record, epochs: print_line(epoch_line(record, epochs, prefix))


def heartbeat(print_line: Callable[[str], None], label: str, every: float = HEARTBEAT_SECONDS,
              clock: Callable[[], float] = time.monotonic) -> Callable[[int, int], None]:
    """An ``on_step(done, total)`` callback that prints where a run is at most every ``every`` seconds."""
    start = last = clock()

    def on_step(done: int, total: int) -> None:
        nonlocal last
        now = clock()
        if now - last >= every:
            last = now
            print_line(f"  … {label}: step {done}/{total} ({now - start:.0f} s)")

    return on_step


def phase_times(timings: dict) -> str:
    """The timings of a run (``metrics["timings"]``) as one line: where the time went."""
    names = {"backbone": "backbone load", "data": "data load + check", "prepare": "method set-up",
             "decode": "image decode", "feature_cache": "frozen features", "train": "training", "val": "val eval",
             "test": "test eval", "save": "artifact save"}
    parts = [f"{names.get(k, k)} {v:.1f} s" for k, v in timings.items() if k != "total" and v >= 0.05]
    total = timings.get("total")
    return (f"{total:.1f} s: " if total is not None else "") + (", ".join(parts) or "-")


__all__ = ["OutputConsole", "print_table", "bars_shown", "epoch_line", "epoch_printer", "heartbeat", "phase_times",
           "HEARTBEAT_SECONDS"]
