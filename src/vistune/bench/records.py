"""Run records: the row each finished run leaves in ``results.sqlite``, and the folders of final runs.

A row is committed as soon as its run finishes. A final run also has a folder, ``runs/<task>/<method>/seed<k>/``,
which gets a marker (``bench-run.json``: which run key owns it, when it started) before training starts, so that
a later bench can tell what a folder it finds holds:

- the marker's run, finished (``metrics.json`` is there) but killed before its row was committed: the row is
  recovered from the folder, and the run is not trained again;
- the marker's run, killed mid-training: it continues from its last checkpoint;
- a run of other settings: the folder is set aside as ``seed<k>.superseded-<i>`` (never deleted), and the rows
  that pointed to it are updated.
"""
from __future__ import annotations

import datetime as _dt
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_write_json
from ..run import METRICS, read_metrics
from ..training.trainer import STATE_FILE
from .plan import Cell, SelectRun, Winner, choose_best, selection_stored
from .progress import SweepDisplay
from .store import Store

RUNS = "runs"
MARKER = "bench-run.json"  # written into a final run's folder before it starts: which run key owns it


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD commit, tracked files modified?) of the git checkout vistune runs from, else (None, None)."""
    pkg = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=pkg,
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() or None, (bool(dirty.stdout.strip()) if dirty.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Outcome:
    """What training one run gave: its metrics (without the model) and "ok", or no metrics and "diverged"."""

    metrics: dict | None
    status: str
    error: str | None = None


@dataclass(frozen=True)
class FinalRun:
    """A final run about to be trained, its folder prepared (marker written)."""

    cell: Cell
    key: str
    lr: float
    wd: float
    seed: int
    folder: Path  # relative to the bench folder
    run_dir: Path
    label: str
    resume: bool  # continue from the folder's checkpoint
    started: str


def select_label(cell: Cell, sel: SelectRun) -> str:
    return f"select {cell.task}/{cell.method} lr={_fmt(sel.lr)} wd={_fmt(sel.wd)}"


def run_row(cell: Cell, phase: str, key: str, lr: float, wd: float, seed: int, metrics: dict | None, *,
            started, finished, commit, dirty, status="ok", error=None, artifact_dir=None) -> dict:
    """The ``runs`` row of one finished run (:data:`vistune.bench.store.COLUMNS`)."""
    m = metrics or {}
    versions = dict(m.get("versions") or {})
    versions["git_dirty"] = dirty
    config = {
        "run_key": json.loads(key), "settings": cell.settings, "method_config": m.get("method_config"),
        "train_config": m.get("train_config"), "preprocessing": m.get("preprocessing"),
        "data": m.get("data"), "data_summary": m.get("data_summary"), "num_classes": m.get("num_classes"),
        "backbone_source": m.get("backbone_source"), "best_epoch": m.get("best_epoch"),
        "history": m.get("history"),
    }
    return {
        "run_key": key, "suite": cell.final_base["suite"], "task": cell.task, "task_group": cell.group,
        "method": cell.method, "phase": phase, "lr": lr, "weight_decay": wd, "seed": seed,
        "backbone": cell.final_base["backbone"]["name"], "epochs": cell.settings["epochs"],
        "image_size": cell.settings["image_size"], "status": status, "error": error,
        "val_accuracy": m.get("val_accuracy"), "test_accuracy": m.get("test_accuracy") if phase == "final" else None,
        "tuned_params": m.get("tuned_params"), "tuned_params_excluding_head": m.get("tuned_params_excluding_head"),
        "backbone_params": m.get("backbone_params"), "artifact_bytes": m.get("artifact_bytes"),
        "artifact_dir": artifact_dir, "train_seconds": m.get("train_seconds"), "wall_seconds": m.get("wall_seconds"),
        "peak_memory_mb": m.get("peak_memory_mb"), "config": json.dumps(config), "versions": json.dumps(versions),
        "git_commit": commit, "device": m.get("device"), "started_at": started, "finished_at": finished,
    }


class RunRecords:
    """Records a sweep's runs in the store and prepares the folders of its final runs; whichever executor
    trains them, it is the only writer (on Ray: the driver process)."""

    def __init__(self, store: Store, out: Path, display: SweepDisplay, commit: str | None, dirty: bool | None):
        self.store, self.out, self.display, self.commit, self.dirty = store, out, display, commit, dirty

    def record_select(self, cell: Cell, sel: SelectRun, outcome: Outcome, *, started: str, seconds: float) -> None:
        metrics = outcome.metrics
        assert metrics is None or metrics["test_accuracy"] is None, "selection must never evaluate test"
        self.store.insert(run_row(cell, "select", sel.key, sel.lr, sel.wd, sel.seed, metrics, started=started,
                                  finished=utc_now(), commit=self.commit, dirty=self.dirty, status=outcome.status,
                                  error=outcome.error))
        result = f"val {metrics['val_accuracy']:.4f}" if metrics else "diverged"
        self.display.finished(f"{select_label(cell, sel)}: {result} ({seconds:.0f} s)")

    def final_runs(self, cell: Cell) -> list[FinalRun]:
        """The final runs a cell still needs (none while its selection is incomplete), their folders prepared."""
        rows = self.store.get_many([s.key for s in cell.select])
        best = choose_best(cell, rows)
        if best is None:
            if selection_stored(cell, rows):
                self.display.warn(f"{cell.task}/{cell.method}: every lr × wd setting diverged; "
                                  "no final runs (try a smaller lr grid)")
                self.display.shrink(len(cell.seeds))
            return []
        out = []
        for seed in cell.seeds:
            if not self.store.has(cell.final_key(best.lr, best.wd, seed)):
                final = self._prepare_final(cell, best, seed)
                if final is not None:
                    out.append(final)
        return out

    def _prepare_final(self, cell: Cell, best: Winner, seed: int) -> FinalRun | None:
        """Recovers a run that finished before its row was stored (None: nothing to train), continues one
        killed mid-training, sets aside a folder of other settings; then writes the folder's marker."""
        lr, wd = best.lr, best.wd
        key = cell.final_key(lr, wd, seed)
        rel = Path(RUNS) / cell.task / cell.method / f"seed{seed}"
        run_dir = self.out / rel
        label = f"final  {cell.task}/{cell.method} lr={_fmt(lr)} wd={_fmt(wd)} seed={seed}"
        resume, started = False, utc_now()
        if run_dir.exists():
            marker = _read_marker(run_dir)
            if marker.get("run_key") == key:
                if (run_dir / METRICS).exists():  # finished, but the process died before the row was committed
                    metrics = read_metrics(run_dir)
                    self.store.insert(run_row(cell, "final", key, lr, wd, seed, metrics,
                                              started=marker.get("started_at"), finished=utc_now(),
                                              commit=self.commit, dirty=self.dirty, artifact_dir=str(rel)))
                    self.display.finished(f"{label}: {_test_text(metrics)} (recovered from {rel})")
                    return None
                resume = (run_dir / STATE_FILE).exists()  # interrupted mid-training: continue from its checkpoint
                started = marker.get("started_at") or started
            else:
                aside = _set_aside(run_dir)
                self.store.move_artifact(str(rel), str(aside.relative_to(self.out)))
                self.display.warn(f"{rel} held a run with other settings; moved it to {aside.name}")
        atomic_write_json(run_dir / MARKER, {"run_key": key, "started_at": started})
        return FinalRun(cell=cell, key=key, lr=lr, wd=wd, seed=seed, folder=rel, run_dir=run_dir, label=label,
                        resume=resume, started=started)

    def record_final(self, final: FinalRun, outcome: Outcome, *, seconds: float) -> None:
        metrics = outcome.metrics
        self.store.insert(run_row(final.cell, "final", final.key, final.lr, final.wd, final.seed, metrics,
                                  started=final.started, finished=utc_now(), commit=self.commit, dirty=self.dirty,
                                  status=outcome.status, error=outcome.error,
                                  artifact_dir=str(final.folder) if metrics else None))
        result = (f"{_test_text(metrics)}, {metrics['artifact_bytes'] / 1024:.0f} KiB" if metrics
                  else "diverged")
        self.display.finished(f"{final.label}: {result} ({seconds:.0f} s{', resumed' if final.resume else ''})")


def _test_text(metrics: dict) -> str:
    t = metrics.get("test_accuracy")
    return "no test split" if t is None else f"test {t:.4f}"


def _read_marker(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _set_aside(run_dir: Path) -> Path:
    i = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.superseded-{i}")).exists():
        i += 1
    run_dir.rename(aside)
    return aside
