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

This module only orchestrates; the work is done by, in the order they depend on each other:

- :mod:`~vistune.bench.plan`: the typed, pure plan (cells, settings, run keys, the selection winner);
- :mod:`~vistune.bench.records`: the rows of finished runs and the folders of final runs;
- :mod:`~vistune.bench.jobs`, :mod:`~vistune.bench.data_cache`, :mod:`~vistune.bench.progress`: one run's
  Job and data, the decoded images shared across runs, the progress display;
- the executors :mod:`~vistune.bench.local_executor` (in process) and :mod:`~vistune.bench.ray_executor`;
- after the runs, the efficiency phase (:func:`measure_methods`, :mod:`~vistune.bench.efficiency`) and the
  report (:mod:`~vistune.bench.report`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from ..backbones import BackboneView, load_backbone
from ..errors import VistuneError
from ..artifacts import check_artifact
from ..methods.procedures import split_label
from ..options import parse_sets
from ..output import OutputConsole
from ..training.trainer import resolve_device
from .jobs import SweepContext, default_image_size
from .local_executor import sweep_in_process
from .plan import Plan, build_plan, check_shared_sets, choose_best, selection_stored
from .progress import SweepDisplay
from .ray_executor import RayOptions, import_ray, sweep_on_ray
from .records import RunRecords, git_commit, utc_now
from .store import STORE, Store, canonical
from .suite import Suite, Task, check_setting, load_suite

LOCK = ".bench.lock"
EFFICIENCY_PROTOCOL = {"steps": 10, "warmup": 3}  # timed steps (median) after warm-up steps
EXECUTORS = ("local", "ray")


@dataclass
class BenchOptions:
    """One ``vistune bench``: what :func:`run_bench` runs (the command's flags, as ``vistune bench --help``
    describes them). Settings left None come from the suite."""

    suite: str | Path | Suite  # a built-in suite name, a .toml file, or a parsed Suite
    methods: list[str] | str  # a list or "linear,bias,…"
    backbone: str | BackboneView  # a timm / vistune name (loaded once), or an already loaded view
    out: str | Path  # the bench folder
    data_root: str | None = None
    tasks: list[str] | None = None  # None: every task of the suite
    epochs: int | None = None
    lr_grid: list[float] | None = None
    wd_grid: list[float] | None = None
    seeds: list[int] | None = None
    image_size: int | None = None
    batch_size: int | None = None
    test_size: int | None = None
    sets: list[str] = field(default_factory=list)  # [METHOD.]KEY=VALUE (vistune.options)
    checkpoint: str | None = None  # with a backbone name: the weights to load
    random_init: bool = False
    model_kwargs: dict | None = None
    device: str = "auto"
    executor: str = "local"  # "local": one after another in this process; "ray": in parallel on Ray
    ray: RayOptions = field(default_factory=RayOptions)
    efficiency: bool = True  # after the runs, measure each method once for the report
    report: bool = True  # write DIR/report.md at the end
    progress: bool = True  # progress bars (the per-run lines are printed either way)
    command: str | None = None  # recorded with the plan
    teacher: str | None = None  # distill:<method> runs: the teacher per task ({task}, {root}); beats the suite's

    def method_names(self) -> list[str]:
        names = self.methods.split(",") if isinstance(self.methods, str) else self.methods
        return [m.strip() for m in names if m.strip()]

    def cli_settings(self) -> dict:
        """The settings given as flags, validated."""
        cli = {}
        for key in ("epochs", "lr_grid", "wd_grid", "seeds", "image_size", "batch_size", "test_size"):
            value = getattr(self, key)
            if value is not None:
                cli[key] = check_setting(key, list(value) if isinstance(value, tuple) else value, "command line")
        return cli


def run_bench(options: BenchOptions, *, console: Console | None = None) -> dict:
    """Run (or continue) a benchmark; returns counts of executed / already stored runs and the report path.

    Everything a user can get wrong (unknown methods, a malformed ``--set``, missing data, Ray not installed)
    fails here before the backbone is loaded or the bench folder is written.
    """
    if options.executor not in EXECUTORS:
        raise VistuneError(f"unknown executor {options.executor!r}", f"use {' or '.join(EXECUTORS)}")
    if options.executor == "ray":
        import_ray()  # fail before loading anything
    console = console or OutputConsole()
    out = Path(options.out)
    suite = options.suite if isinstance(options.suite, Suite) else load_suite(options.suite)
    methods = options.method_names()
    if not methods:
        raise VistuneError("no methods given", "pass e.g. --methods linear,bias,adapter (see `vistune methods`)")
    if len(set(methods)) != len(methods):
        raise VistuneError(f"--methods lists a method twice: {','.join(methods)}", "list each method once")
    for m in methods:
        split_label(m)  # fail fast on a misspelt method or procedure, before loading anything
    sets = parse_sets(options.sets, methods)
    check_shared_sets(sets, methods)
    cli = options.cli_settings()
    chosen_tasks = suite.select_tasks(options.tasks)
    root = options.data_root or suite.root
    _check_data(suite, chosen_tasks, root)
    teachers = _teachers(suite, chosen_tasks, root, options.teacher, methods)

    with _bench_lock(out), Store(out / STORE) as store:
        backbone = options.backbone
        if isinstance(backbone, str):
            console.print(f"loading backbone {backbone} …", markup=False)
            backbone = load_backbone(backbone, checkpoint=options.checkpoint, random_init=options.random_init,
                                     model_kwargs=options.model_kwargs)
        plan = build_plan(suite, chosen_tasks, methods, backbone, cli=cli, sets=sets,
                          default_image_size=default_image_size(backbone), teachers=teachers)
        store.add_bench(utc_now(), options.command or "python: vistune.bench.run_bench", plan.to_dict())
        summary = _sweep(plan, suite, root, backbone, out, store, options, console)
        if options.efficiency:
            summary["efficiency_measured"] = measure_methods(plan, backbone, store, device=options.device,
                                                             console=console)
    if options.report:
        from .report import write_report

        summary["report"] = str(write_report(out))
        console.print(f"report: {summary['report']} (+ {out / 'accuracy_vs_params.png'})", markup=False)
    return summary


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


def _teachers(suite: Suite, tasks: list[Task], root: str | None, template: str | None,
              methods: list[str]) -> dict[str, dict]:
    """The teacher artifact of every task, for ``distill:<method>`` labels (none needed otherwise): ``--teacher``
    or the suite's [distill] teacher, with {task} and {root} filled in, each checked (and hashed) now."""
    if not any(split_label(m)[0] is not None for m in methods):
        return {}
    template = template or suite.distill.get("teacher")
    if not template:
        raise VistuneError(f"--methods has distillation runs ({', '.join(m for m in methods if ':' in m)}) but no "
                           "teacher is named", 'pass --teacher "<folder>/{task}" (a vistune run per task) or set '
                           'teacher in the suite\'s [distill] table')
    out = {}
    for task in tasks:
        path = template.replace("{task}", task.name).replace("{root}", str(root or ""))
        try:
            meta = check_artifact(path)
        except VistuneError as e:
            raise VistuneError(f"the teacher of task {task.name!r} ({template} → {path}): {e.what}",
                               f"train one first, e.g. vistune train --backbone tf_efficientnet_lite2 --method linear "
                               f"--data {suite.data_spec(task, root)} --out {path}") from None
        out[task.name] = {"path": str(Path(path).resolve()), "tensors_sha256": meta["tensors_sha256"]}
    return out


def _pending_runs(plan: Plan, store: Store) -> tuple[int, int]:
    """(planned, still to run): exact for cells whose selection is complete, all seeds otherwise."""
    stored = store.get_many([s.key for c in plan.cells for s in c.select])
    total_runs = pending = 0
    for cell in plan.cells:
        total_runs += len(cell.select) + len(cell.seeds)
        pending += sum(s.key not in stored for s in cell.select)
        best = choose_best(cell, stored)
        if best is None and selection_stored(cell, stored):
            continue  # every setting diverged: no final runs
        if best is None:
            pending += len(cell.seeds)
        else:
            pending += sum(not store.has(cell.final_key(best.lr, best.wd, s)) for s in cell.seeds)
    return total_runs, pending


def _sweep(plan: Plan, suite: Suite, root: str | None, backbone, out: Path, store: Store, options: BenchOptions,
           console: Console) -> dict:
    total_runs, pending = _pending_runs(plan, store)
    n_tasks = len({c.task for c in plan.cells})
    console.print(Text.assemble(("vistune bench", "bold"),
                                f" {plan.suite}: {n_tasks} task(s) × {len(plan.methods)} method(s) on "
                                f"{plan.backbone['name']} ({plan.backbone['source']}) → {out}"
                                + (" on Ray" if options.executor == "ray" else "")))
    if pending < total_runs:
        console.print(f"resuming: {total_runs - pending} of {total_runs} runs are already in {out / STORE}",
                      markup=False)
    display = SweepDisplay(console, pending, options.progress)
    commit, dirty = git_commit()
    ctx = SweepContext(suite=suite, root=root, backbone=backbone, out=out, device=options.device, display=display,
                       records=RunRecords(store, out, display, commit, dirty))
    try:
        if options.executor == "ray":
            executed = sweep_on_ray(plan, ctx, options.ray)
        else:
            executed = sweep_in_process(plan, ctx)
    finally:
        display.close()
    return {"executed": executed, "already_stored": total_runs - pending, "planned": total_runs,
            "store": str(out / STORE)}


def measure_methods(plan: Plan, backbone, store: Store, *, device: str, console: Console) -> int:
    """One efficiency measurement per method (same protocol for all; at the first task's image size, batch
    size and class count), each in a fresh process, one at a time after the training runs so that no
    other run competes for the device. Stored like runs: a method measured before is not measured again."""
    # imported here: `python -m vistune.bench.efficiency` (the child) must not find itself imported already
    from .efficiency import backbone_spec_of, device_name, measure_efficiency, measure_in_subprocess

    try:
        spec = backbone_spec_of(backbone)
    except VistuneError:
        spec = None  # a backbone a child process cannot rebuild (e.g. non-JSON model kwargs): measure here
    where = device_name(resolve_device(device))
    trained = [r for r in store.rows() if r["status"] == "ok"]
    measured = 0
    for method in plan.methods:
        cell = next(c for c in plan.cells if c.method == method)
        rows = [r for r in trained if r["method"] == method and r["task"] == cell.task]
        if not rows:
            continue  # nothing trained (all diverged): no class count to build the head with
        num_classes = json.loads(rows[0]["config"])["num_classes"]
        s = cell.settings
        key = canonical({"phase": "efficiency", "method": method, "options": cell.options,
                         "backbone": plan.backbone, "image_size": s["image_size"], "batch_size": s["batch_size"],
                         "num_classes": num_classes, "device": where, "protocol": EFFICIENCY_PROTOCOL})
        if store.efficiency(key) is not None:
            continue
        console.print(f"efficiency: {method} on {where} (batch {s['batch_size']}, {s['image_size']} px) …",
                      markup=False)
        kwargs = dict(image_size=s["image_size"], batch_size=s["batch_size"], device=device,
                      **EFFICIENCY_PROTOCOL)
        student = cell.student_method  # a distilled student costs what its method costs
        if spec is not None:
            result = {**measure_in_subprocess(spec, student, cell.options, num_classes, **kwargs),
                      "process": "fresh"}
        else:
            result = {**measure_efficiency(backbone, student, cell.options, num_classes, **kwargs),
                      "process": "bench (shared)"}
        store.insert_efficiency(key, method, plan.backbone["name"], result, utc_now())
        measured += 1
    return measured


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["vistune", *sys.argv[1:]])
