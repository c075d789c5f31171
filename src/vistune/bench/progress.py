"""What a sweep shows while it runs: a bar over the whole sweep (with its ETA), one over the steps of the run
in progress (in-process sweeps), and a line per finished run. Where the console is no terminal (CI logs, a
pipe) no bar can show: a heartbeat line every minute of a long run stands in for them."""
from __future__ import annotations

import time

from rich.console import Console
from rich.text import Text

from ..output import HEARTBEAT_SECONDS, heartbeat


def duration(seconds: float | None) -> str:
    """``H:MM:SS``, or ``?`` when unknown."""
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class SweepDisplay:
    """``progress=False``: the per-run lines alone (no bars, no heartbeat)."""

    heartbeat_seconds = HEARTBEAT_SECONDS

    def __init__(self, console: Console, total: int, progress: bool):
        self.console, self.total, self.done, self.t0 = console, total, 0, time.perf_counter()
        self.progress = None
        self.heartbeat = progress and not console.is_terminal  # lines where no bar can show
        if progress and total and console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]{task.fields[what]}[/]"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), TextColumn("{task.description}", markup=False),
                                     console=console, speed_estimate_period=7 * 24 * 3600, transient=False)
            self.task = self.progress.add_task("", total=total, what="bench", unit="runs")
            self.run_task = self.progress.add_task("", total=1, what="run  ", unit="steps", visible=False)
            self.progress.start()

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def run_bar(self, label: str):
        """A fresh bar for the run about to start; returns its ``on_step(done, total)``: the bar's, a heartbeat's
        where no bar shows, or None with progress off."""
        if self.progress is None:
            return heartbeat(self.line, label, self.heartbeat_seconds) if self.heartbeat else None
        self.progress.reset(self.run_task, total=1, completed=0, visible=True, description=label)

        def on_step(done: int, total: int) -> None:
            self.progress.update(self.run_task, total=total, completed=done)

        return on_step

    def shrink(self, n: int) -> None:
        """Fewer runs than planned (a cell whose every selection run diverged has no final runs)."""
        self.total -= n
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def waiting(self, text: str) -> None:
        """A heartbeat while runs go on elsewhere (on Ray): printed where no bar shows."""
        if self.heartbeat:
            self.line(f"  … {text}")

    def warn(self, text: str) -> None:
        self.console.print(text, style="yellow", markup=False, highlight=False, soft_wrap=True)

    def finished(self, line: str) -> None:
        self.done += 1
        left = self.total - self.done
        eta = (time.perf_counter() - self.t0) / self.done * left if self.done else None
        self.console.print(Text.assemble(line, (f"  [{self.done}/{self.total}, ETA {duration(eta)}]", "dim")),
                           highlight=False, soft_wrap=True)
        if self.progress is not None:
            self.progress.update(self.task, advance=1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
