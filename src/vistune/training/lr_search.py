"""``--lr auto``: a short val-based search of the base learning rate, before the real run.

Each candidate trains the freshly initialised model for a few steps (the same data, loss and optimizer as
the run, at a constant lr), then scores on a fixed part of the val split; the model is restored to its
initial state after every candidate, so the run that follows computes exactly what ``--lr <chosen>`` computes.
The candidates are the method's default base lr × 1/10, 1/3, 1, 3, 10; when the best one sits at an end of that
range (and did not diverge), the range grows by ×3 steps in that direction, at most :data:`MAX_EXTENSIONS`
times (downwards while every candidate diverged; if all still do, the run stops with TrainingDiverged). The
choice: among the candidates whose val accuracy is within one standard error of the best, the one with the
lowest val loss (an overconfident too-high lr and an underfit too-low one both lose there).

The trainer supplies the probe (training layer only: :func:`vistune.training.trainer.train` calls
:func:`search`); for head-only methods the probes run on cached features and cost next to nothing.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import TrainingDiverged

FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)  # × the method's default base lr
EXTEND = 3.0
MAX_EXTENSIONS = 2
PROBE_STEPS = 20  # training steps per candidate (fewer when the whole run is shorter)
PROBE_VAL_IMAGES = 256  # the val images each candidate is scored on (all of a smaller val split)


class ProbeDiverged(Exception):
    """A candidate's probe diverged (its loss became non-finite or exploded): the candidate is out."""


@dataclass
class Candidate:
    lr: float  # base lr (× batch/256 like --lr)
    status: str  # "ok" or "diverged"
    val_accuracy: float | None = None
    val_loss: float | None = None


@dataclass
class LrSearch:
    """What ``--lr auto`` tried and chose (stored in metrics.json under ``lr_search``)."""

    optimizer: str
    default_lr: float  # the method's default base lr, the centre of the candidates
    chosen: float
    steps: int  # training steps per candidate
    val_images: int
    reason: str
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LrSearch":
        return cls(**{**d, "candidates": [Candidate(**c) for c in d["candidates"]]})

    def lines(self) -> list[str]:
        """What a user reads: every candidate's score and the choice with its reason."""
        out = [f"--lr auto: {len(self.candidates)} base lrs ({self.optimizer}), {self.steps} steps each from the "
               f"initial state, scored on {self.val_images} val images:"]
        for c in sorted(self.candidates, key=lambda c: c.lr, reverse=True):
            score = ("diverged" if c.status != "ok" else
                     f"val accuracy {c.val_accuracy:.3f}, val loss {c.val_loss:.3f}")
            mark = "  ← chosen" if c.lr == self.chosen else ("  (method default)" if c.lr == self.default_lr else "")
            out.append(f"  lr {c.lr:<10.4g} {score}{mark}")
        out.append(f"--lr auto chose base lr {self.chosen:.4g}: {self.reason}")
        return out


def candidates_around(default_lr: float) -> list[float]:
    return [_round(default_lr * f) for f in FACTORS]


def search(default_lr: float, probe: Callable[[float], tuple[float, float]], *, optimizer: str, steps: int,
           val_images: int) -> LrSearch:
    """Score the candidates with ``probe(base_lr) -> (val accuracy, val loss)`` (raising :class:`ProbeDiverged`
    for a candidate that diverges) and choose one; see the module docstring."""
    tried: dict[float, Candidate] = {}

    def run(lr: float) -> Candidate:
        if lr not in tried:
            try:
                acc, loss = probe(lr)
                tried[lr] = Candidate(lr, "ok", acc, loss)
            except ProbeDiverged:
                tried[lr] = Candidate(lr, "diverged")
        return tried[lr]

    for lr in candidates_around(default_lr):
        run(lr)
    for _ in range(MAX_EXTENSIONS):
        ok = [c for c in tried.values() if c.status == "ok"]
        lrs = sorted(tried)
        if not ok:  # everything diverged: further down
            run(_round(lrs[0] / EXTEND))
        elif (best := _best(ok, val_images)).lr == lrs[-1]:
            run(_round(lrs[-1] * EXTEND))
        elif best.lr == lrs[0]:
            run(_round(lrs[0] / EXTEND))
        else:
            break
    ok = [c for c in tried.values() if c.status == "ok"]
    if not ok:
        lowest = min(tried)
        raise TrainingDiverged(
            f"--lr auto: every candidate base lr ({', '.join(f'{lr:g}' for lr in sorted(tried))}) diverged within "
            f"{steps} steps",
            f"pass a lower --lr yourself, e.g. --lr {_round(lowest / 10):g}; check the data for broken images")
    best = _best(ok, val_images)
    top = max(c.val_accuracy for c in ok)
    near = [c for c in ok if c.val_accuracy >= top - _standard_error(top, val_images)]
    reason = (f"the best val accuracy ({top:.3f})" if len(near) == 1 else
              f"the lowest val loss ({best.val_loss:.3f}) of the {len(near)} candidates within one standard error "
              f"of the best val accuracy {top:.3f}")
    return LrSearch(optimizer=optimizer, default_lr=_round(default_lr), chosen=best.lr, steps=steps,
                    val_images=val_images, reason=reason, candidates=sorted(tried.values(), key=lambda c: c.lr))


def _best(ok: list[Candidate], n: int) -> Candidate:
    top = max(c.val_accuracy for c in ok)
    near = [c for c in ok if c.val_accuracy >= top - _standard_error(top, n)]
    return min(near, key=lambda c: (c.val_loss, c.lr))


def _standard_error(p: float, n: int) -> float:
    return max(1.0 / max(1, n), math.sqrt(max(p * (1 - p), 0.0) / max(1, n)))


def _round(lr: float) -> float:
    """Three significant digits: the candidates print and compare as the numbers a user would pass to --lr."""
    return float(f"{lr:.3g}")
