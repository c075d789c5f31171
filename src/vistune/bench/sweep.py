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
EFFICIENCY_PROTOCOL = {"steps": 10, "warmup": 3}  # timed steps (median) after warm-up steps
CLI_SETTINGS = ("epochs", "lr_grid", "wd_grid", "seeds", "image_size", "batch_size", "test_size")


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
    """A progress bar over the whole sweep (ETA included), one for the run in progress (in-process sweeps)
    and a line per finished run."""

    def __init__(self, console: Console, total: int, progress: bool):
        self.console, self.total, self.done, self.t0 = console, total, 0, time.perf_counter()
        self.executed_seconds = 0.0
        self.progress = None
        if progress and total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]{task.fields[what]}[/]"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), TextColumn("{task.description}"),
                                     console=console, speed_estimate_period=7 * 24 * 3600, transient=False)
            self.task = self.progress.add_task("", total=total, what="bench", unit="runs")
            self.run_task = self.progress.add_task("", total=1, what="run  ", unit="steps", visible=False)
            self.progress.start()

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def run_bar(self, label: str):
        """A fresh bar for the run about to start; returns its ``on_step(done, total)`` (None without bars)."""
        if self.progress is None:
            return None
        self.progress.reset(self.run_task, total=1, completed=0, visible=True, description=label)

        def on_step(done: int, total: int) -> None:
            self.progress.update(self.run_task, total=total, completed=done)

        return on_step

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
              console: Console | None = None, command: str | None = None, report: bool = True,
              executor: str = "local", ray_options: dict | None = None, efficiency: bool = True) -> dict:
    """Run (or continue) a benchmark; returns counts of executed / already stored runs and the report path.

    ``backbone`` is a name (loaded once, with ``checkpoint``/``random_init``/``model_kwargs``) or an
    already loaded :class:`~vistune.backbones.BackboneView` (e.g. a tiny one in tests).
    ``executor``: "local" (runs one after another in this process) or "ray" (in parallel on Ray;
    ``ray_options``: address, cpus_per_run, gpus_per_run of :func:`~vistune.bench.ray_executor.sweep_on_ray`).
    ``efficiency``: after the runs, measure each method once (:mod:`vistune.bench.efficiency`) for the report.
    """
    if executor not in ("local", "ray"):
        raise VistuneError(f"unknown executor {executor!r}", "use local or ray")
    if executor == "ray":
        from .ray_executor import import_ray

        import_ray()  # fail before loading anything
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
        store.add_bench(utc_now(), command or "python: vistune.bench.run_bench", plan)
        commit, dirty = git_commit()
        summary = _sweep(plan, suite, root, backbone, out, store, device=device, progress=progress,
                         console=console, commit=commit, dirty=dirty, executor=executor, ray_options=ray_options)
        if efficiency:
            summary["efficiency_measured"] = measure_methods(plan, backbone, store, device=device, console=console)
    if report:
        from .report import write_report

        summary["report"] = str(write_report(out))
        console.print(f"report: {summary['report']} (+ {out / 'accuracy_vs_params.png'})")
    return summary


def measure_methods(plan: dict, backbone, store: Store, *, device: str, console: Console) -> int:
    """One efficiency measurement per method (same protocol for all; at the first task's image size, batch
    size and class count), each in a fresh process, one at a time after the training runs so that no
    other run competes for the device. Stored like runs: a method measured before is not measured again."""
    from ..training.trainer import resolve_device
    from .efficiency import backbone_spec_of, device_name, measure_efficiency, measure_in_subprocess

    try:
        spec = backbone_spec_of(backbone)
    except VistuneError:
        spec = None  # a backbone a child process cannot rebuild (e.g. non-JSON model kwargs): measure here
    where = device_name(resolve_device(device))
    trained = [r for r in store.rows() if r["status"] == "ok"]
    measured = 0
    for method in plan["methods"]:
        cell = next(c for c in plan["cells"] if c["method"] == method)
        rows = [r for r in trained if r["method"] == method and r["task"] == cell["task"]]
        if not rows:
            continue  # nothing trained (all diverged): no class count to build the head with
        num_classes = json.loads(rows[0]["config"])["num_classes"]
        s = cell["settings"]
        key = canonical({"phase": "efficiency", "method": method, "options": cell["options"],
                         "backbone": plan["backbone"], "image_size": s["image_size"], "batch_size": s["batch_size"],
                         "num_classes": num_classes, "device": where, "protocol": EFFICIENCY_PROTOCOL})
        if store.efficiency(key) is not None:
            continue
        console.print(f"efficiency: {method} on {where} (batch {s['batch_size']}, {s['image_size']} px) …")
        kwargs = dict(image_size=s["image_size"], batch_size=s["batch_size"], device=device,
                      **EFFICIENCY_PROTOCOL)
        if spec is not None:
            result = {**measure_in_subprocess(spec, method, cell["options"], num_classes, **kwargs),
                      "process": "fresh"}
        else:
            result = {**measure_efficiency(backbone, method, cell["options"], num_classes, **kwargs),
                      "process": "bench (shared)"}
        store.insert_efficiency(key, method, plan["backbone"]["name"], result, utc_now())
        measured += 1
    return measured


def _pending_runs(plan: dict, store: Store) -> tuple[int, int]:
    """(planned, still to run): exact for cells whose selection is complete, all seeds otherwise."""
    stored = store.get_many([s["key"] for c in plan["cells"] for s in c["select"]])
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
    return total_runs, pending


def _sweep(plan: dict, suite: Suite, root, backbone, out: Path, store: Store, *, device: str, progress: bool,
           console: Console, commit, dirty, executor: str = "local", ray_options: dict | None = None) -> dict:
    total_runs, pending = _pending_runs(plan, store)
    n_tasks, n_methods = len({c["task"] for c in plan["cells"]}), len(plan["methods"])
    console.print(f"[bold]vistune bench[/] {plan['suite']}: {n_tasks} task(s) × {n_methods} method(s) on "
                  f"{plan['backbone']['name']} ({plan['backbone']['source']}) → {out}"
                  + (" on Ray" if executor == "ray" else ""))
    if pending < total_runs:
        console.print(f"resuming: {total_runs - pending} of {total_runs} runs are already in {out / STORE}")
    display = _Display(console, pending, progress)
    ctx = SweepContext(suite=suite, root=root, backbone=backbone, out=out, store=store, device=device, display=display,
                   commit=commit, dirty=dirty)
    try:
        if executor == "ray":
            from .ray_executor import sweep_on_ray

            executed = sweep_on_ray(plan, ctx, **(ray_options or {}))
        else:
            executed = _sweep_in_process(plan, ctx)
    finally:
        display.close()
    return {"executed": executed, "already_stored": total_runs - pending, "planned": total_runs,
            "store": str(out / STORE)}


@dataclasses.dataclass
class SweepContext:
    """What every run of a sweep shares, whichever executor runs it."""
    suite: Suite
    root: str | None
    backbone: object
    out: Path
    store: Store
    device: str
    display: _Display
    commit: str | None
    dirty: bool | None

    def spec(self, cell: dict) -> str:
        return self.suite.data_spec({t.name: t for t in self.suite.tasks}[cell["task"]], self.root)


def _sweep_in_process(plan: dict, ctx: SweepContext) -> int:
    """Runs one after another in this process; each task's data is decoded once per phase."""
    cells_by_task: dict[str, list[dict]] = {}
    for cell in plan["cells"]:
        cells_by_task.setdefault(cell["task"], []).append(cell)
    executed = 0
    for cells in cells_by_task.values():
        spec = ctx.spec(cells[0])
        # ---- selection: train subset → val subset; the data carry no test split at all
        todo = [(c, s) for c in cells for s in c["select"] if not ctx.store.has(s["key"])]
        if todo:
            data = load_phase_data(ctx.backbone, cells[0], spec, "select")
            for cell, sel in todo:
                label, job = select_job(cell, sel, spec, ctx)
                ctx.display.describe(label)
                started, t0 = utc_now(), time.perf_counter()
                outcome = execute(job, ctx.backbone, data, on_step=ctx.display.run_bar(label))
                record_select(cell, sel, outcome, ctx, label=label, started=started,
                              seconds=time.perf_counter() - t0)
                executed += 1
            del data
        # ---- final: the best setting, retrained on train + val with each seed, tested once
        finals = [f for cell in cells for f in final_runs(cell, ctx)]
        if finals:
            data = load_phase_data(ctx.backbone, cells[0], spec, "final")
            for final in finals:
                ctx.display.describe(final["label"])
                t0 = time.perf_counter()
                outcome = execute(final["job"], ctx.backbone, data, resume=final["resume"],
                                  on_step=ctx.display.run_bar(final["label"]))
                record_final(final, outcome, ctx, seconds=time.perf_counter() - t0)
                executed += 1
            del data
    return executed


def load_phase_data(backbone, cell: dict, spec: str, phase: str):
    """A task's data for one phase ("select": train/val subsets and no test split; "final": train+val and
    test), with the transforms of the cell's preprocessing (the same for all methods of a task)."""
    from ..data import load_data

    s = cell["settings"]
    job = Job(backbone=backbone.spec.name, method=cell["method"], data=spec, image_size=s["image_size"],
              normalization=s["normalization"], augment=s["augment"])
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, job))
    final = phase == "final"
    data = load_data(spec, train_transform=train_tf, eval_transform=eval_tf, train_size=s["train_size"],
                     val_size=s["val_size"], test_size=s["test_size"] if final else None,
                     seed=s["data_seed"], protocol="final" if final else "train-val")
    if not final:
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


def execute(job: Job, backbone, data, resume: bool = False, on_step=None) -> tuple[dict | None, str, str | None]:
    """Train one run: (metrics without the model, "ok", None) or (None, "diverged", why)."""
    try:
        metrics = run_job(job, resume=resume, progress=False, backbone=backbone, data=data, on_step=on_step)
    except TrainingDiverged as e:
        return None, "diverged", e.what
    metrics.pop("model", None)
    return metrics, "ok", None


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


def select_job(cell: dict, sel: dict, spec: str, ctx: SweepContext) -> tuple[str, Job]:
    label = f"select {cell['task']}/{cell['method']} lr={_fmt(sel['lr'])} wd={_fmt(sel['wd'])}"
    return label, _job(cell, spec, ctx.backbone, lr=sel["lr"], wd=sel["wd"], seed=sel["seed"], device=ctx.device,
                       final=False)


def record_select(cell: dict, sel: dict, outcome, ctx: SweepContext, *, label: str, started: str,
                  seconds: float) -> None:
    metrics, status, error = outcome
    assert metrics is None or metrics["test_accuracy"] is None, "selection must never evaluate test"
    ctx.store.insert(_row(cell, "select", sel["key"], sel["lr"], sel["wd"], sel["seed"], metrics, started=started,
                          finished=utc_now(), commit=ctx.commit, dirty=ctx.dirty, status=status, error=error))
    result = f"val {metrics['val_accuracy']:.4f}" if metrics else "[yellow]diverged[/]"
    ctx.display.finished(f"{label}: {result} ({seconds:.0f} s)", seconds)


def final_runs(cell: dict, ctx: SweepContext) -> list[dict]:
    """The final runs a cell still needs (none while its selection is incomplete). Prepares each run's
    folder: recovers a run that finished before its row was stored, sets aside a folder of other settings."""
    rows = ctx.store.get_many([s["key"] for s in cell["select"]])
    best = choose_best(cell, rows)
    if best is None:
        if all(s["key"] in rows for s in cell["select"]):
            ctx.display.console.print(f"[yellow]{cell['task']}/{cell['method']}: every lr × wd setting diverged; "
                                      "no final runs (try a smaller lr grid)[/]")
            ctx.display.shrink(len(cell["seeds"]))
        return []
    out = []
    for seed in cell["seeds"]:
        if not ctx.store.has(final_key(cell, best["lr"], best["wd"], seed)):
            final = _prepare_final(cell, best, seed, ctx)
            if final is not None:
                out.append(final)
    return out


def _prepare_final(cell: dict, best: dict, seed: int, ctx: SweepContext) -> dict | None:
    lr, wd = best["lr"], best["wd"]
    key = final_key(cell, lr, wd, seed)
    rel = Path(RUNS) / cell["task"] / cell["method"] / f"seed{seed}"
    run_dir = ctx.out / rel
    label = f"final  {cell['task']}/{cell['method']} lr={_fmt(lr)} wd={_fmt(wd)} seed={seed}"
    final = {"cell": cell, "key": key, "lr": lr, "wd": wd, "seed": seed, "rel": rel, "label": label,
             "resume": False, "started": utc_now()}
    if run_dir.exists():
        marker = _read_marker(run_dir)
        if marker.get("run_key") == key:
            if (run_dir / METRICS).exists():  # finished, but the process died before the row was committed
                metrics = read_metrics(run_dir)
                ctx.store.insert(_row(cell, "final", key, lr, wd, seed, metrics, started=marker.get("started_at"),
                                      finished=utc_now(), commit=ctx.commit, dirty=ctx.dirty, artifact_dir=str(rel)))
                ctx.display.finished(f"{label}: {_test_text(metrics)} (recovered from {rel})", 0.0)
                return None
            final["resume"] = (run_dir / STATE_FILE).exists()  # interrupted mid-training: continue from its checkpoint
            final["started"] = marker.get("started_at") or final["started"]
        else:
            aside = _set_aside(run_dir)
            ctx.store.move_artifact(str(rel), str(aside.relative_to(ctx.out)))
            ctx.display.console.print(f"[yellow]{rel} held a run with other settings; moved it to {aside.name}[/]")
    atomic_write_json(run_dir / MARKER, {"run_key": key, "started_at": final["started"]})
    final["job"] = _job(cell, ctx.spec(cell), ctx.backbone, lr=lr, wd=wd, seed=seed, device=ctx.device,
                        out=run_dir, final=True)
    return final


def record_final(final: dict, outcome, ctx: SweepContext, *, seconds: float) -> None:
    metrics, status, error = outcome
    cell = final["cell"]
    ctx.store.insert(_row(cell, "final", final["key"], final["lr"], final["wd"], final["seed"], metrics,
                          started=final["started"], finished=utc_now(), commit=ctx.commit, dirty=ctx.dirty,
                          status=status, error=error, artifact_dir=str(final["rel"]) if metrics else None))
    result = (f"{_test_text(metrics)}, {metrics['artifact_bytes'] / 1024:.0f} KiB" if metrics
              else "[yellow]diverged[/]")
    ctx.display.finished(f"{final['label']}: {result} ({seconds:.0f} s{', resumed' if final['resume'] else ''})",
                         seconds)


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
