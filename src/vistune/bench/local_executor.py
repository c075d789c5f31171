"""Run a sweep's runs one after another in this process (``vistune bench``, the default executor)."""
from __future__ import annotations

import time

from .jobs import SweepContext, execute, final_job, load_phase_data, select_job
from .plan import Cell, Plan
from .records import select_label, utc_now


def sweep_in_process(plan: Plan, ctx: SweepContext) -> int:
    """Every pending run of ``plan``, task by task; each task's data is decoded once per phase.
    Returns the number of runs executed."""
    cells_by_task: dict[str, list[Cell]] = {}
    for cell in plan.cells:
        cells_by_task.setdefault(cell.task, []).append(cell)
    store = ctx.records.store
    executed = 0
    for cells in cells_by_task.values():
        spec = ctx.spec(cells[0])
        # ---- selection: train subset → val subset; the data carry no test split at all
        todo = [(c, s) for c in cells for s in c.select if not store.has(s.key)]
        if todo:
            data = load_phase_data(ctx.backbone, cells[0], spec, "select")
            for cell, sel in todo:
                label = select_label(cell, sel)
                ctx.display.describe(label)
                started, t0 = utc_now(), time.perf_counter()
                outcome = execute(select_job(cell, sel, ctx), ctx.backbone, data, on_step=ctx.display.run_bar(label))
                ctx.records.record_select(cell, sel, outcome, started=started, seconds=time.perf_counter() - t0)
                executed += 1
            del data
        # ---- final: the best setting, retrained on train + val with each seed, tested once
        finals = [f for cell in cells for f in ctx.records.final_runs(cell)]
        if finals:
            data = load_phase_data(ctx.backbone, cells[0], spec, "final")
            for final in finals:
                ctx.display.describe(final.label)
                t0 = time.perf_counter()
                outcome = execute(final_job(final, ctx), ctx.backbone, data, resume=final.resume,
                                  on_step=ctx.display.run_bar(final.label))
                ctx.records.record_final(final, outcome, seconds=time.perf_counter() - t0)
                executed += 1
            del data
    return executed
