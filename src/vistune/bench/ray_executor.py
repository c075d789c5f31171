"""Run a sweep's runs in parallel on Ray (``vistune bench --executor ray``; ``pip install 'vistune[ray]'``).

The driver (the ``vistune bench`` process) keeps everything that must happen once: it owns the SQLite store
and the run folders' markers, submits every pending selection run at once, and submits a cell's final runs
as soon as its last selection run is stored. Workers only train: each gets the loaded backbone from Ray's
object store, decodes a task's data once per phase (kept for the next run of the same task and phase), and
returns the metrics. A final run writes its artifact into the bench folder itself, so on a multi-machine
cluster that folder must be shared storage. Killed and restarted, the sweep resumes like the in-process one:
a run is stored when it finishes, and only missing runs are submitted again.
"""
from __future__ import annotations

import time

from ..errors import VistuneError
from .store import canonical
from .sweep import (
    SweepContext,
    execute,
    final_runs,
    load_phase_data,
    record_final,
    record_select,
    select_job,
    utc_now,
)

_PHASE_DATA: dict[str, object] = {}  # per worker process: the data of the last task × phase it trained on


def _train(job, backbone, cell: dict, spec: str, phase: str, resume: bool):
    """A worker's run: (outcome, seconds). Reuses the decoded data of the previous run when it matches."""
    key = canonical({"spec": spec, "phase": phase, "settings": cell["settings"]})
    if key not in _PHASE_DATA:
        _PHASE_DATA.clear()  # one task × phase at a time: memory stays that of one in-process run
        _PHASE_DATA[key] = load_phase_data(backbone, cell, spec, phase)
    t0 = time.perf_counter()
    outcome = execute(job, backbone, _PHASE_DATA[key], resume=resume)
    return outcome, time.perf_counter() - t0


def import_ray():
    try:
        import ray
    except ImportError:
        raise VistuneError("--executor ray needs Ray, which is not installed",
                           "pip install 'vistune[ray]' (or run without --executor ray: runs then go one "
                           "after another in this process)") from None
    return ray


def sweep_on_ray(plan: dict, ctx: SweepContext, *, address: str | None = None, cpus_per_run: float = 1.0,
                 gpus_per_run: float | None = None) -> int:
    """Run every pending run of ``plan`` on a Ray cluster; returns the number executed.

    ``address``: an existing cluster ("auto", "ray://host:10001", …); default: one started on this machine
    for the bench and shut down after it. ``gpus_per_run`` defaults to 1 when the runs use CUDA, else 0.
    """
    ray = import_ray()
    if gpus_per_run is None:
        gpus_per_run = 0.0 if ctx.device == "cpu" else _cuda_gpus()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    train = ray.remote(_train).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
    backbone_ref = ray.put(ctx.backbone)
    in_flight: dict = {}  # object ref → (kind, item, label, started)

    def submit_select(cell: dict, sel: dict) -> None:
        spec = ctx.spec(cell)
        label, job = select_job(cell, sel, spec, ctx)
        ref = train.remote(job, backbone_ref, cell, spec, "select", False)
        in_flight[ref] = ("select", (cell, sel), label, utc_now())

    def submit_finals(cell: dict) -> None:
        for final in final_runs(cell, ctx):
            ref = train.remote(final["job"], backbone_ref, cell, ctx.spec(cell), "final", final["resume"])
            in_flight[ref] = ("final", final, final["label"], final["started"])

    for cell in plan["cells"]:
        todo = [s for s in cell["select"] if not ctx.store.has(s["key"])]
        for sel in todo:
            submit_select(cell, sel)
        if not todo:
            submit_finals(cell)
    executed = 0
    try:
        while in_flight:
            ctx.display.describe(f"{len(in_flight)} run(s) submitted to Ray")
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            kind, item, label, started = in_flight.pop(ref)
            outcome, seconds = ray.get(ref)
            executed += 1
            if kind == "select":
                cell, sel = item
                record_select(cell, sel, outcome, ctx, label=label, started=started, seconds=seconds)
                if all(ctx.store.has(s["key"]) for s in cell["select"]):
                    submit_finals(cell)
            else:
                record_final(item, outcome, ctx, seconds=seconds)
    finally:
        for ref in in_flight:  # an error or Ctrl-C: stop what is still running; stored runs stay stored
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    return executed


def _cuda_gpus() -> float:
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0
