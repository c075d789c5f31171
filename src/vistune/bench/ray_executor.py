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
from dataclasses import dataclass

from ..errors import VistuneError
from .jobs import SweepContext, execute, final_job, load_phase_data, select_job
from .plan import Cell, Plan, SelectRun
from .records import FinalRun, utc_now
from .store import canonical

_PHASE_DATA: dict[str, object] = {}  # per worker process: the data of the last task × phase it trained on


@dataclass(frozen=True)
class RayOptions:
    """Where and with what the runs go on Ray (``--ray-address``, ``--cpus-per-run``, ``--gpus-per-run``)."""

    address: str | None = None  # an existing cluster ("auto", "ray://host:10001", …); None: start one here
    cpus_per_run: float = 1.0
    gpus_per_run: float | None = None  # None: 1 when the runs use CUDA, else 0


def _train(job, backbone, cell: Cell, spec: str, phase: str, resume: bool):
    """A worker's run: (outcome, seconds). Reuses the decoded data of the previous run when it matches."""
    key = canonical({"spec": spec, "phase": phase, "settings": cell.settings})
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


def sweep_on_ray(plan: Plan, ctx: SweepContext, options: RayOptions) -> int:
    """Run every pending run of ``plan`` on a Ray cluster; returns the number executed.

    Without ``options.address``, a Ray instance is started on this machine for the bench and shut down after it.
    """
    ray = import_ray()
    gpus_per_run = options.gpus_per_run
    if gpus_per_run is None:
        gpus_per_run = 0.0 if ctx.device == "cpu" else _cuda_gpus()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    train = ray.remote(_train).options(num_cpus=options.cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
    backbone_ref = ray.put(ctx.backbone)
    records, store = ctx.records, ctx.records.store
    in_flight: dict = {}  # object ref → (the SelectRun's (cell, sel) or the FinalRun, started)

    def submit_select(cell: Cell, sel: SelectRun) -> None:
        ref = train.remote(select_job(cell, sel, ctx), backbone_ref, cell, ctx.spec(cell), "select", False)
        in_flight[ref] = ((cell, sel), utc_now())

    def submit_finals(cell: Cell) -> None:
        for final in records.final_runs(cell):
            ref = train.remote(final_job(final, ctx), backbone_ref, cell, ctx.spec(cell), "final", final.resume)
            in_flight[ref] = (final, final.started)

    for cell in plan.cells:
        todo = [s for s in cell.select if not store.has(s.key)]
        for sel in todo:
            submit_select(cell, sel)
        if not todo:
            submit_finals(cell)
    executed = 0
    try:
        while in_flight:
            ctx.display.describe(f"{len(in_flight)} run(s) submitted to Ray")
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=ctx.display.heartbeat_seconds)
            if not ready:
                ctx.display.waiting(f"{len(in_flight)} run(s) on Ray, {executed} finished in this bench")
                continue
            ref = ready[0]
            item, started = in_flight.pop(ref)
            outcome, seconds = ray.get(ref)
            executed += 1
            if isinstance(item, FinalRun):
                records.record_final(item, outcome, seconds=seconds)
            else:
                cell, sel = item
                records.record_select(cell, sel, outcome, started=started, seconds=seconds)
                if all(store.has(s.key) for s in cell.select):
                    submit_finals(cell)
    finally:
        for ref in in_flight:  # an error or Ctrl-C: stop what is still running; stored runs stay stored
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    return executed


def _cuda_gpus() -> float:
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0
