"""A sweep's runs as :class:`~vistune.run.Job` s, for either executor: the context the runs share, each run's
Job, a task's data for one phase, and training one run."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import load_data, verify_decodable
from ..distill import DistillJob, run_distill
from ..errors import TrainingDiverged
from ..methods.procedures import procedure_config
from ..run import Job, preprocessing_for, run_job, transforms_for
from ..training import TrainConfig
from .data_cache import maybe_cache
from .plan import Cell, SelectRun
from .progress import SweepDisplay
from .records import FinalRun, Outcome, RunRecords
from .suite import Suite


@dataclasses.dataclass
class SweepContext:
    """What every run of a sweep shares, whichever executor runs it."""

    suite: Suite
    root: str | None
    backbone: object  # the loaded BackboneView, loaded once per bench
    out: Path
    device: str
    display: SweepDisplay
    records: RunRecords

    def spec(self, cell: Cell) -> str:
        """The cell's data spec with ``{root}`` filled in."""
        return self.suite.data_spec({t.name: t for t in self.suite.tasks}[cell.task], self.root)


def default_image_size(backbone) -> int:
    """The backbone's pretrained input size (timm's data config): the image size when no setting gives one."""
    return preprocessing_for(backbone, Job(backbone=backbone.spec.name, method="", data="", image_size=None))[
        "image_size"]


def _job(cell: Cell, ctx: SweepContext, *, lr: float, wd: float, seed: int, out: Path | None,
         final: bool) -> Job | DistillJob:
    """The run's Job; a ``distill:<method>`` cell's is a DistillJob around the job of its method."""
    s = cell.settings
    b = ctx.backbone.spec
    train = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=lr, weight_decay=wd,
                        optimizer=s["optimizer"], warmup_epochs=s["warmup_epochs"], seed=seed, device=ctx.device,
                        select="last" if final else "best-val")
    job = Job(backbone=b.name, method=cell.student_method, data=ctx.spec(cell),
              out=None if out is None else str(out), overrides=dict(cell.options), checkpoint=b.checkpoint,
              random_init=b.source == "random-init", model_kwargs=dict(b.model_kwargs or {}),
              image_size=s["image_size"], normalization=s["normalization"], augment=s["augment"],
              train_size=s["train_size"], val_size=s["val_size"], data_seed=s["data_seed"],
              protocol="final" if final else "train-val", train=train)
    if cell.procedure is None:
        return job
    p = cell.procedure
    return DistillJob(job, p["teacher"]["path"], procedure_config(p["name"], p["settings"]))


def select_job(cell: Cell, sel: SelectRun, ctx: SweepContext) -> Job | DistillJob:
    """A selection run: best-val epoch on the train/val subsets, no folder (nothing is kept but its row)."""
    return _job(cell, ctx, lr=sel.lr, wd=sel.wd, seed=sel.seed, out=None, final=False)


def final_job(final: FinalRun, ctx: SweepContext) -> Job | DistillJob:
    """A final run: the last epoch on train + val, written into its prepared folder."""
    return _job(final.cell, ctx, lr=final.lr, wd=final.wd, seed=final.seed, out=final.run_dir, final=True)


def load_phase_data(backbone, cell: Cell, spec: str, phase: str):
    """A task's data for one phase ("select": train/val subsets and no test split; "final": train+val and
    test), with the transforms of the cell's preprocessing (the same for all methods of a task)."""
    s = cell.settings
    job = Job(backbone=backbone.spec.name, method=cell.method, data=spec, image_size=s["image_size"],
              normalization=s["normalization"], augment=s["augment"])
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, job))
    final = phase == "final"
    data = load_data(spec, train_transform=train_tf, eval_transform=eval_tf, train_size=s["train_size"],
                     val_size=s["val_size"], test_size=s["test_size"] if final else None,
                     data_seed=s["data_seed"], protocol="final" if final else "train-val")
    verify_decodable(data)
    if not final:
        data = dataclasses.replace(data, test=None)  # selection never sees test
    return dataclasses.replace(data, train=maybe_cache(data.train, s["image_size"], s["augment"]),
                               val=maybe_cache(data.val, s["image_size"], s["augment"]))


def execute(job: Job | DistillJob, backbone, data, resume: bool = False, on_step=None) -> Outcome:
    """Train one run; a diverged run is an outcome (a failed setting), not an error."""
    run = run_distill if isinstance(job, DistillJob) else run_job
    try:
        metrics = run(job, resume=resume, progress=False, backbone=backbone, data=data, on_step=on_step)
    except TrainingDiverged as e:
        return Outcome(None, "diverged", e.what)
    metrics.pop("model", None)
    return Outcome(metrics, "ok")
