"""The sweep behind ``vistune bench``: the VPT protocol over tasks × methods, resumable.

For every task × method:

1. *selection*: every lr × weight decay of the grid is trained on the train subset (VTAB-1k: 800)
   and scored on the val subset (200). Test is never looked at: the selection data carry no test
   split at all. The best val accuracy wins; ties go to the smaller lr, then the smaller wd.
2. *final*: the best setting is retrained on train + val (protocol ``final``) with each seed,
   keeping the last epoch (as VPT), and evaluated once on test. The table reports mean ± std over seeds.

The backbone is loaded once per bench and each task's data once per phase. Every finished run is
a row of ``DIR/results.sqlite`` (committed at once); a run whose key is already there is skipped,
so an interrupted bench continues where it stopped when the same command is run again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from .._io import atomic_write_json
from ..errors import TrainingDiverged, VistuneError, suggest
from ..run import METRICS, Job, preprocessing_for, read_metrics, run_job, transforms_for
from ..training import TrainConfig
from ..training.trainer import STATE_FILE, InMemory
from .store import STORE, Store, canonical
from .suite import METHOD_SETTINGS, SETTINGS, Suite, Task, check_setting, load_suite

RUNS = "runs"
MARKER = "bench-run.json"  # written into a final run's folder before it starts: which run key owns it
LOCK = ".bench.lock"
CACHE_LIMIT_BYTES = 2 * 2**30  # keep decoded train/val tensors in memory across runs below this size
CLI_SETTINGS = ("epochs", "lr_grid", "wd_grid", "seeds", "image_size", "batch_size", "test_size")


def _now() -> str:
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


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------- the plan
def parse_method_sets(sets: list[str] | dict | None, methods: list[str]) -> dict[str, dict]:
    """``["adapter.reduction=8", "linear.epochs=30"]`` → {method: {key: value}} (values stay strings)."""
    if isinstance(sets, dict):
        out = {m: dict(v) for m, v in sets.items()}
    else:
        out: dict[str, dict] = {}
        for item in sets or []:
            lhs, eq, value = item.partition("=")
            method, dot, key = lhs.strip().partition(".")
            if not eq or not dot or not method or not key.strip():
                raise VistuneError(f"--set {item!r} is not METHOD.KEY=VALUE",
                                   "write e.g. --set adapter.reduction=8 or --set linear.epochs=30")
            out.setdefault(method, {})[key.strip()] = value.strip()
    for m in out:
        if m not in methods:
            raise VistuneError(f"--set names method {m!r}, which is not in --methods.{suggest(m, methods)}",
                               f"--methods is {','.join(methods)}; prefix each --set with one of them")
    return out


def _coerce_setting(key: str, value, where: str):
    """A per-method setting given as a CLI string ("30", "0.1,0.5", "adamw") or a TOML value."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if key in ("lr_grid", "wd_grid"):
                value = [float(v) for v in text.split(",") if v.strip()]
            elif key in ("epochs", "batch_size", "warmup_epochs"):
                value = int(text)
            elif key == "optimizer":
                value = text.lower()
        except ValueError:
            raise VistuneError(f"{where}: {key}={value!r} is not valid", f"{key}: {SETTINGS[key]}") from None
    return check_setting(key, value, where)


def _split_method_table(table: dict, method: str, where: str) -> tuple[dict, dict]:
    settings, options = {}, {}
    for k, v in table.items():
        if k in METHOD_SETTINGS:
            settings[k] = _coerce_setting(k, v, where)
        elif k in SETTINGS:
            raise VistuneError(f"{where}: {k} is a per-task setting; it cannot differ between methods",
                               f"set it for all methods (e.g. --{k.replace('_', '-')}) or in the suite's [defaults]")
        else:
            options[k] = v
    return settings, options


def _backbone_key(backbone) -> dict:
    spec = backbone.spec
    source = spec.source
    if source == "file" and spec.checkpoint:
        source = f"file:{Path(spec.checkpoint).name}"
    return {"name": spec.name, "architecture": spec.architecture, "source": source,
            "model_kwargs": spec.model_kwargs or {}}


def build_plan(suite: Suite, tasks: list[Task], methods: list[str], backbone, *, cli: dict,
               method_sets: dict[str, dict]) -> dict:
    """Every cell (task × method) with its resolved settings and the run keys of its selection runs."""
    from ..methods import make_config, resolve_method

    bkey = _backbone_key(backbone)
    family_errors = []
    method_info = {}
    for m in methods:
        info, _ = resolve_method(m)  # unknown method → VistuneError with suggestions
        method_info[m] = info
        if backbone.family not in info.families:
            family_errors.append(f"{m} (supports {', '.join(info.families)})")
    if family_errors:
        raise VistuneError(
            f"backbone {backbone.spec.name!r} is of the {backbone.family} family, which these methods do not "
            f"support: {'; '.join(family_errors)}",
            "drop them from --methods, or use a backbone of a family they support (`vistune methods`)",
        )
    cells = []
    for task in tasks:
        task_settings = {**suite.defaults, **task.overrides}
        for m in methods:
            info = method_info[m]
            settings = dict(task_settings)
            options: dict = {}
            for label in dict.fromkeys([info.name, m]):  # [methods.adapter] then [methods.adapter-…]
                if label in suite.methods:
                    s, o = _split_method_table(suite.methods[label], m, f"suite [methods.{label}]")
                    settings.update(s)
                    options.update(o)
            settings.update({k: v for k, v in cli.items() if v is not None})
            s, o = _split_method_table(method_sets.get(m, {}), m, f"--set {m}.…")
            settings.update(s)
            options.update(o)
            config = make_config(m, options)  # validates the options now, before any training
            resolved = config.to_dict()
            key_options = {k: resolved.get(k, v) for k, v in sorted(options.items())}
            if settings["image_size"] is None:
                probe = Job(backbone=backbone.spec.name, method=m, data="", image_size=None)
                settings["image_size"] = preprocessing_for(backbone, probe)["image_size"]
            base = {
                "suite": suite.name, "task": task.name, "data": task.data, "method": m, "options": key_options,
                "backbone": bkey, "epochs": settings["epochs"], "batch_size": settings["batch_size"],
                "optimizer": settings["optimizer"], "warmup_epochs": settings["warmup_epochs"],
                "image_size": settings["image_size"], "normalization": settings["normalization"],
                "augment": settings["augment"], "train_size": settings["train_size"],
                "val_size": settings["val_size"], "data_seed": settings["data_seed"],
            }
            select_seed = settings["seeds"][0]
            select = [{"lr": lr, "wd": wd, "seed": select_seed,
                       "key": canonical({**base, "phase": "select", "lr": lr, "wd": wd, "seed": select_seed})}
                      for lr in settings["lr_grid"] for wd in settings["wd_grid"]]
            cells.append({"task": task.name, "group": task.group, "method": m, "options": key_options,
                          "settings": settings, "select": select, "seeds": list(settings["seeds"]),
                          "final_base": {**base, "phase": "final", "test_size": settings["test_size"]}})
    return {
        "suite": suite.name, "suite_description": suite.description, "suite_path": suite.path,
        "backbone": bkey, "backbone_params": backbone.num_params(),
        "signature": canonical({"suite": suite.name, "backbone": bkey, "cli": cli}),
        "tasks": [{"name": t.name, "group": t.group} for t in tasks], "methods": list(methods), "cells": cells,
    }


def final_key(cell: dict, lr: float, wd: float, seed: int) -> str:
    return canonical({**cell["final_base"], "lr": lr, "wd": wd, "seed": seed})


def choose_best(cell: dict, rows: dict[str, dict]) -> dict | None:
    """The selection winner from the stored rows: best val accuracy; ties → smaller lr, then smaller wd.

    None while any selection run of the cell is missing, or when every one of them diverged."""
    found = [rows.get(s["key"]) for s in cell["select"]]
    if any(r is None for r in found):
        return None
    ok = [(r, s) for r, s in zip(found, cell["select"]) if r["status"] == "ok" and r["val_accuracy"] is not None]
    if not ok:
        return None
    r, s = min(ok, key=lambda rs: (-rs[0]["val_accuracy"], rs[1]["lr"], rs[1]["wd"]))
    return {"lr": s["lr"], "wd": s["wd"], "val_accuracy": r["val_accuracy"]}


# ------------------------------------------------------------------------------------------ the sweep
@contextlib.contextmanager
def _bench_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no protection against two benches
        yield
        return
    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise VistuneError(f"another `vistune bench` is running on {out}",
                               "wait for it to finish, or use another --out folder") from None
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_data(suite: Suite, tasks: list[Task], root: str | None) -> None:
    needing = [t for t in tasks if t.needs_root()]
    if not needing:
        return
    how = suite.root_help or "put each task's data in <root>/<task>"
    if not root:
        raise VistuneError(
            f"suite {suite.name!r} reads its data from a folder you provide, and no --data-root was given",
            f"{how}; then pass --data-root <root> (or set root = \"…\" in a copy of the suite file)",
        )
    if not Path(root).expanduser().is_dir():
        raise VistuneError(f"--data-root {root} is not a folder", f"{how}; then pass that folder as --data-root")
    missing = [t.name for t in needing if not Path(suite.data_spec(t, root)).is_dir()]
    if missing:
        raise VistuneError(
            f"{root} lacks the folder(s) of {len(missing)} task(s) of suite {suite.name!r}: {', '.join(missing)}",
            f"{how}; or run the tasks you have with --tasks "
            f"{','.join(t.name for t in needing if t.name not in missing) or '<task,…>'}",
        )


class SharedCache(InMemory):
    """Decoded, transformed images kept across the runs of a phase; otherwise behaves as the wrapped dataset."""

    def with_transform(self, transform):
        return self.dataset.with_transform(transform)

    def __getattr__(self, name):  # only for attributes the cache lacks (subset, paths, …)
        if name.startswith("__") or name in ("dataset", "items", "labels"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _maybe_cache(ds, image_size: int, augment: bool):
    """Share decoded, transformed images across the runs of a phase (deterministic pipelines only)."""
    if augment or ds is None or len(ds) * 3 * image_size * image_size * 4 > CACHE_LIMIT_BYTES:
        return ds
    return SharedCache(ds)


class _Display:
    """One progress bar over the whole sweep (ETA included) and a line per finished run."""

    def __init__(self, console: Console, total: int, progress: bool):
        self.console, self.total, self.done, self.t0 = console, total, 0, time.perf_counter()
        self.executed_seconds = 0.0
        self.progress = None
        if progress and total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("runs"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), TextColumn("{task.description}"),
                                     console=console, speed_estimate_period=7 * 24 * 3600, transient=False)
            self.task = self.progress.add_task("", total=total)
            self.progress.start()

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def shrink(self, n: int) -> None:
        """Fewer runs than planned (a cell whose every selection run diverged has no final runs)."""
        self.total -= n
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def finished(self, line: str, seconds: float) -> None:
        self.done += 1
        self.executed_seconds += seconds
        left = self.total - self.done
        eta = (time.perf_counter() - self.t0) / self.done * left if self.done else None
        self.console.print(f"{line}  [dim][{self.done}/{self.total}, ETA {_duration(eta)}][/]", highlight=False,
                           soft_wrap=True)
        if self.progress is not None:
            self.progress.update(self.task, advance=1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def run_bench(suite: str | Path | Suite, methods: list[str] | str, backbone, out: str | Path, *,
              data_root: str | None = None, epochs: int | None = None, lr_grid: list[float] | None = None,
              wd_grid: list[float] | None = None, seeds: list[int] | None = None, tasks: list[str] | None = None,
              device: str = "auto", image_size: int | None = None, batch_size: int | None = None,
              test_size: int | None = None, sets: list[str] | dict | None = None, checkpoint: str | None = None,
              random_init: bool = False, model_kwargs: dict | None = None, progress: bool = True,
              console: Console | None = None, command: str | None = None, report: bool = True) -> dict:
    """Run (or continue) a benchmark; returns counts of executed / already stored runs and the report path.

    ``backbone`` is a name (loaded once, with ``checkpoint``/``random_init``/``model_kwargs``) or an
    already loaded :class:`~vistune.backbones.BackboneView` (e.g. a tiny one in tests).
    """
    console = console or Console()
    out = Path(out)
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    methods = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not methods:
        raise VistuneError("no methods given", "pass e.g. --methods linear,bias,adapter (see `vistune methods`)")
    if len(set(methods)) != len(methods):
        raise VistuneError(f"--methods lists a method twice: {','.join(methods)}", "list each method once")
    from ..methods import resolve_method

    for m in methods:
        resolve_method(m)  # fail fast on a misspelt name, before loading anything
    method_sets = parse_method_sets(sets, methods)
    cli = {}
    for key, value in (("epochs", epochs), ("lr_grid", lr_grid), ("wd_grid", wd_grid), ("seeds", seeds),
                       ("image_size", image_size), ("batch_size", batch_size), ("test_size", test_size)):
        if value is not None:
            cli[key] = check_setting(key, list(value) if isinstance(value, tuple) else value, "command line")
    chosen_tasks = suite.select_tasks(tasks)
    root = data_root or suite.root
    _check_data(suite, chosen_tasks, root)

    with _bench_lock(out), Store(out / STORE) as store:
        if isinstance(backbone, str):
            from ..backbones import load_backbone

            console.print(f"loading backbone {backbone} …")
            backbone = load_backbone(backbone, checkpoint=checkpoint, random_init=random_init,
                                     model_kwargs=model_kwargs)
        plan = build_plan(suite, chosen_tasks, methods, backbone, cli=cli, method_sets=method_sets)
        store.add_bench(_now(), command or "python: vistune.bench.run_bench", plan)
        commit, dirty = git_commit()
        summary = _sweep(plan, suite, root, backbone, out, store, device=device, progress=progress,
                         console=console, commit=commit, dirty=dirty)
    if report:
        from .report import write_report

        summary["report"] = str(write_report(out))
        console.print(f"report: {summary['report']} (+ {out / 'accuracy_vs_params.png'})")
    return summary


def _sweep(plan: dict, suite: Suite, root, backbone, out: Path, store: Store, *, device: str, progress: bool,
           console: Console, commit, dirty) -> dict:
    cells_by_task: dict[str, list[dict]] = {}
    for cell in plan["cells"]:
        cells_by_task.setdefault(cell["task"], []).append(cell)
    tasks = {t.name: t for t in suite.tasks}

    # how many runs are left: exact for cells whose selection is complete, all seeds otherwise
    all_keys = [s["key"] for c in plan["cells"] for s in c["select"]]
    stored = store.get_many(all_keys)
    total_runs = pending = 0
    for cell in plan["cells"]:
        total_runs += len(cell["select"]) + len(cell["seeds"])
        pending += sum(s["key"] not in stored for s in cell["select"])
        best = choose_best(cell, stored)
        if best is None and all(s["key"] in stored for s in cell["select"]):
            continue  # every setting diverged: no final runs
        if best is None:
            pending += len(cell["seeds"])
        else:
            pending += sum(not store.has(final_key(cell, best["lr"], best["wd"], s)) for s in cell["seeds"])
    n_tasks, n_methods = len(cells_by_task), len(plan["methods"])
    console.print(f"[bold]vistune bench[/] {plan['suite']}: {n_tasks} task(s) × {n_methods} method(s) on "
                  f"{plan['backbone']['name']} ({plan['backbone']['source']}) → {out}")
    if pending < total_runs:
        console.print(f"resuming: {total_runs - pending} of {total_runs} runs are already in {out / STORE}")
    display = _Display(console, pending, progress)
    executed = 0
    ctx = dict(backbone=backbone, out=out, store=store, device=device, display=display, commit=commit,
               dirty=dirty, root=root, suite=suite)
    try:
        for task_name, cells in cells_by_task.items():
            task = tasks[task_name]
            spec = suite.data_spec(task, root)
            # ---- selection: train subset → val subset; the data carry no test split at all
            todo = [(c, s) for c in cells for s in c["select"] if not store.has(s["key"])]
            if todo:
                data = _load(backbone, cells[0], spec, "train-val", with_test=False)
                for cell, sel in todo:
                    executed += _run_select(cell, sel, spec, data, **ctx)
                del data
            # ---- final: the best setting, retrained on train + val with each seed, tested once
            finals = []
            for cell in cells:
                rows = store.get_many([s["key"] for s in cell["select"]])
                best = choose_best(cell, rows)
                if best is None:
                    if all(s["key"] in rows for s in cell["select"]):
                        console.print(f"[yellow]{task_name}/{cell['method']}: every lr × wd setting diverged; "
                                      "no final runs (try a smaller lr grid)[/]")
                        display.shrink(len(cell["seeds"]))
                    continue
                finals += [(cell, best, seed) for seed in cell["seeds"]
                           if not store.has(final_key(cell, best["lr"], best["wd"], seed))]
            if finals:
                data = _load(backbone, cells[0], spec, "final", with_test=True)
                for cell, best, seed in finals:
                    executed += _run_final(cell, best, seed, spec, data, **ctx)
                del data
    finally:
        display.close()
    return {"executed": executed, "already_stored": total_runs - pending, "planned": total_runs,
            "store": str(out / STORE)}


def _load(backbone, cell: dict, spec: str, protocol: str, with_test: bool):
    """A task's data for one phase, with the transforms of the cell's preprocessing (same for all methods)."""
    from ..data import load_data

    s = cell["settings"]
    job = Job(backbone=backbone.spec.name, method=cell["method"], data=spec, image_size=s["image_size"],
              normalization=s["normalization"], augment=s["augment"])
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, job))
    data = load_data(spec, train_transform=train_tf, eval_transform=eval_tf, train_size=s["train_size"],
                     val_size=s["val_size"], test_size=s["test_size"] if with_test else None,
                     seed=s["data_seed"], protocol=protocol)
    if not with_test:
        data = dataclasses.replace(data, test=None)  # selection never sees test
    return dataclasses.replace(data, train=_maybe_cache(data.train, s["image_size"], s["augment"]),
                               val=_maybe_cache(data.val, s["image_size"], s["augment"]))


def _job(cell: dict, spec: str, backbone, *, lr, wd, seed, device, out=None, final: bool) -> Job:
    s = cell["settings"]
    b = backbone.spec
    train = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=lr, weight_decay=wd,
                        optimizer=s["optimizer"], warmup_epochs=s["warmup_epochs"], seed=seed, device=device,
                        select="last" if final else "best-val")
    return Job(backbone=b.name, method=cell["method"], data=spec, out=None if out is None else str(out),
               overrides=dict(cell["options"]), checkpoint=b.checkpoint, random_init=b.source == "random-init",
               model_kwargs=dict(b.model_kwargs or {}), image_size=s["image_size"],
               normalization=s["normalization"], augment=s["augment"], train_size=s["train_size"],
               val_size=s["val_size"], protocol="final" if final else "train-val", train=train)


def _row(cell, phase, key, lr, wd, seed, metrics, *, started, finished, commit, dirty, status="ok", error=None,
         artifact_dir=None) -> dict:
    m = metrics or {}
    versions = dict(m.get("versions") or {})
    versions["git_dirty"] = dirty
    config = {
        "run_key": json.loads(key), "settings": cell["settings"], "method_config": m.get("method_config"),
        "train_config": m.get("train_config"), "preprocessing": m.get("preprocessing"),
        "data": m.get("data"), "data_summary": m.get("data_summary"), "num_classes": m.get("num_classes"),
        "backbone_source": m.get("backbone_source"), "best_epoch": m.get("best_epoch"),
        "history": m.get("history"),
    }
    return {
        "run_key": key, "suite": cell["final_base"]["suite"], "task": cell["task"], "task_group": cell["group"],
        "method": cell["method"], "phase": phase, "lr": lr, "weight_decay": wd, "seed": seed,
        "backbone": cell["final_base"]["backbone"]["name"], "epochs": cell["settings"]["epochs"],
        "image_size": cell["settings"]["image_size"], "status": status, "error": error,
        "val_accuracy": m.get("val_accuracy"), "test_accuracy": m.get("test_accuracy") if phase == "final" else None,
        "tuned_params": m.get("tuned_params"), "tuned_params_excluding_head": m.get("tuned_params_excluding_head"),
        "backbone_params": m.get("backbone_params"), "artifact_bytes": m.get("artifact_bytes"),
        "artifact_dir": artifact_dir, "train_seconds": m.get("train_seconds"), "wall_seconds": m.get("wall_seconds"),
        "peak_memory_mb": m.get("peak_memory_mb"), "config": json.dumps(config), "versions": json.dumps(versions),
        "git_commit": commit, "device": m.get("device"), "started_at": started, "finished_at": finished,
    }



def _run_select(cell, sel, spec, data, *, backbone, out, store, device, display, commit, dirty, root, suite) -> int:
    lr, wd, seed = sel["lr"], sel["wd"], sel["seed"]
    label = f"select {cell['task']}/{cell['method']} lr={_fmt(lr)} wd={_fmt(wd)}"
    display.describe(label)
    job = _job(cell, spec, backbone, lr=lr, wd=wd, seed=seed, device=device, final=False)
    started, t0 = _now(), time.perf_counter()
    try:
        metrics = run_job(job, progress=False, backbone=backbone, data=data)
        metrics.pop("model", None)
        status, error = "ok", None
    except TrainingDiverged as e:
        metrics, status, error = None, "diverged", e.what
    assert metrics is None or metrics["test_accuracy"] is None, "selection must never evaluate test"
    store.insert(_row(cell, "select", sel["key"], lr, wd, seed, metrics, started=started, finished=_now(),
                      commit=commit, dirty=dirty, status=status, error=error))
    seconds = time.perf_counter() - t0
    result = f"val {metrics['val_accuracy']:.4f}" if metrics else "[yellow]diverged[/]"
    display.finished(f"{label}: {result} ({seconds:.0f} s)", seconds)
    return 1


def _run_final(cell, best, seed, spec, data, *, backbone, out, store, device, display, commit, dirty, root,
               suite) -> int:
    lr, wd = best["lr"], best["wd"]
    key = final_key(cell, lr, wd, seed)
    rel = Path(RUNS) / cell["task"] / cell["method"] / f"seed{seed}"
    run_dir = out / rel
    label = f"final  {cell['task']}/{cell['method']} lr={_fmt(lr)} wd={_fmt(wd)} seed={seed}"
    display.describe(label)
    resume, started = False, _now()
    if run_dir.exists():
        marker = _read_marker(run_dir)
        if marker.get("run_key") == key:
            if (run_dir / METRICS).exists():  # finished, but the process died before the row was committed
                metrics = read_metrics(run_dir)
                store.insert(_row(cell, "final", key, lr, wd, seed, metrics, started=marker.get("started_at"),
                                  finished=_now(), commit=commit, dirty=dirty, artifact_dir=str(rel)))
                display.finished(f"{label}: {_test_text(metrics)} (recovered from {rel})", 0.0)
                return 0
            resume = (run_dir / STATE_FILE).exists()  # interrupted mid-training: continue from its checkpoint
            started = marker.get("started_at") or started
        else:
            aside = _set_aside(run_dir)
            store.move_artifact(str(rel), str(aside.relative_to(out)))
            display.console.print(f"[yellow]{rel} held a run with other settings; moved it to {aside.name}[/]")
    atomic_write_json(run_dir / MARKER, {"run_key": key, "started_at": started})
    job = _job(cell, spec, backbone, lr=lr, wd=wd, seed=seed, device=device, out=run_dir, final=True)
    t0 = time.perf_counter()
    try:
        metrics = run_job(job, resume=resume, progress=False, backbone=backbone, data=data)
        metrics.pop("model", None)
        status, error = "ok", None
    except TrainingDiverged as e:
        metrics, status, error = None, "diverged", e.what
    store.insert(_row(cell, "final", key, lr, wd, seed, metrics, started=started, finished=_now(), commit=commit,
                      dirty=dirty, status=status, error=error, artifact_dir=str(rel) if metrics else None))
    seconds = time.perf_counter() - t0
    result = (f"{_test_text(metrics)}, {metrics['artifact_bytes'] / 1024:.0f} KiB" if metrics
              else "[yellow]diverged[/]")
    display.finished(f"{label}: {result} ({seconds:.0f} s{', resumed' if resume else ''})", seconds)
    return 1


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


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["vistune", *sys.argv[1:]])
