"""User-facing errors: each says what went wrong, where, and how to fix it."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class VistuneError(Exception):
    """An error caused by input the user can fix; the CLI prints it without a traceback."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what}\n  fix: {fix}")


class TrainingDiverged(VistuneError):
    """The loss became NaN/inf: in a sweep, a failed setting rather than a failed sweep."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean X?' for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
