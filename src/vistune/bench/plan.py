"""The plan of a bench: every cell (task × method) with its resolved settings and the keys of its runs.

Pure: building a plan reads the suite, the ``--set`` pairs and the loaded backbone's identity, validates
every method's options, and touches neither files nor training. The selection winner of a cell is chosen
from stored rows given to :func:`choose_best`.

Settings resolve, lowest first: the suite's ``[defaults]`` < the task's keys < ``[methods.<name>]`` <
command-line flags (``--epochs``, ``--lr-grid``, …) < ``--set KEY=VALUE`` < ``--set METHOD.KEY=VALUE``.

A plan is stored as JSON with each bench invocation (``benches.plan`` of ``results.sqlite``): its
:meth:`Plan.to_dict` is that JSON's form, and :meth:`Plan.from_dict` reads it back, including the
plain-dict plans written before these classes existed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import VistuneError
from ..methods import make_config, resolve_method
from ..methods.procedures import procedure_config, split_label
from ..options import OptionSets
from .store import canonical
from .suite import METHOD_SETTINGS, SETTINGS, Suite, Task, check_setting


@dataclass(frozen=True)
class SelectRun:
    """One lr × weight decay of a cell's grid: trained on the train subset, scored on the val subset."""

    lr: float
    wd: float
    seed: int
    key: str  # its run key

    def to_dict(self) -> dict:
        return {"lr": self.lr, "wd": self.wd, "seed": self.seed, "key": self.key}

    @classmethod
    def from_dict(cls, d: dict) -> SelectRun:
        return cls(lr=d["lr"], wd=d["wd"], seed=d["seed"], key=d["key"])


@dataclass(frozen=True)
class PlannedTask:
    name: str
    group: str

    def to_dict(self) -> dict:
        return {"name": self.name, "group": self.group}

    @classmethod
    def from_dict(cls, d: dict) -> PlannedTask:
        return cls(name=d["name"], group=d["group"])


@dataclass(frozen=True)
class Winner:
    """A cell's selection winner: best val accuracy; ties → smaller lr, then smaller wd."""

    lr: float
    wd: float
    val_accuracy: float


@dataclass(frozen=True)
class Cell:
    """One task × method: its settings (the suite's keys, resolved), its selection grid and final seeds."""

    task: str
    group: str
    method: str
    options: dict  # the method options given (suite or --set), with their resolved values
    settings: dict  # every key of suite.SETTINGS
    select: list[SelectRun]
    seeds: list[int]
    final_base: dict  # the run key of its final runs, less lr, wd and seed
    # a procedure around the method (label "distill:linear"): {"name", "method", "settings", "teacher"}; else None
    procedure: dict | None = None

    @property
    def student_method(self) -> str:
        """The registered method the cell trains (its label less a procedure prefix)."""
        return self.procedure["method"] if self.procedure else self.method

    @property
    def data(self) -> str:
        """The task's data spec as the run keys hold it (``{root}`` unresolved)."""
        return self.final_base["data"]

    @property
    def test_size(self) -> int | None:
        return self.final_base.get("test_size")

    def final_key(self, lr: float, wd: float, seed: int) -> str:
        return canonical({**self.final_base, "lr": lr, "wd": wd, "seed": seed})

    def to_dict(self) -> dict:
        return {"task": self.task, "group": self.group, "method": self.method, "options": self.options,
                "settings": self.settings, "select": [s.to_dict() for s in self.select], "seeds": self.seeds,
                "final_base": self.final_base, **({"procedure": self.procedure} if self.procedure else {})}

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(task=d["task"], group=d["group"], method=d["method"], options=dict(d["options"]),
                   settings=dict(d["settings"]), select=[SelectRun.from_dict(s) for s in d["select"]],
                   seeds=list(d["seeds"]), final_base=dict(d["final_base"]), procedure=d.get("procedure"))


@dataclass(frozen=True)
class Plan:
    suite: str
    suite_description: str
    suite_path: str | None
    backbone: dict  # the backbone part of every run key: name, architecture, source, model_kwargs
    backbone_params: int | None
    signature: str | None  # benches with the same signature (suite, backbone, flags) share a report
    tasks: list[PlannedTask]
    methods: list[str]
    cells: list[Cell]

    def to_dict(self) -> dict:
        return {"suite": self.suite, "suite_description": self.suite_description, "suite_path": self.suite_path,
                "backbone": self.backbone, "backbone_params": self.backbone_params, "signature": self.signature,
                "tasks": [t.to_dict() for t in self.tasks], "methods": self.methods,
                "cells": [c.to_dict() for c in self.cells]}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        try:
            return cls(suite=d["suite"], suite_description=d.get("suite_description") or "",
                       suite_path=d.get("suite_path"), backbone=dict(d["backbone"]),
                       backbone_params=d.get("backbone_params"), signature=d.get("signature"),
                       tasks=[PlannedTask.from_dict(t) for t in d["tasks"]], methods=list(d["methods"]),
                       cells=[Cell.from_dict(c) for c in d["cells"]])
        except (KeyError, TypeError, AttributeError) as e:
            raise VistuneError(f"a stored bench plan is not one this vistune can read ({type(e).__name__}: {e})",
                               "report it with the vistune version that ran the bench, or use a new --out "
                               "folder") from None


# ------------------------------------------------------------------------------------------- settings
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


def _split_method_table(table: dict, where: str) -> tuple[dict, dict]:
    """(per-method settings, method options) of a ``[methods.<name>]`` table or of ``--set`` pairs."""
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


def check_shared_sets(sets: OptionSets, methods: list[str]) -> None:
    """A bare ``--set KEY=VALUE`` is for every method: when only some of them have that option, name the
    others and give the prefixed pairs to write instead (a key no method has is left to the method's own
    error, which suggests the option meant)."""
    fields = {m: {f.name for f in dataclasses.fields(resolve_method(split_label(m)[1])[0].config_class)}
              for m in methods}
    for key, value in sets.shared.items():
        if key in SETTINGS:
            continue
        has = [m for m in methods if key in fields[m]]
        lacking = [m for m in methods if m not in has]
        if lacking and has:
            raise VistuneError(
                f"--set {key}={value} applies to every method in --methods, and {', '.join(lacking)} "
                f"{'has' if len(lacking) == 1 else 'have'} no option {key!r}",
                "give the method(s) it is for: " + " ".join(f"--set {m}.{key}={value}" for m in has),
            )


def backbone_key(backbone) -> dict:
    """The backbone part of a run key (a checkpoint by its file name, so a moved file keeps its runs)."""
    spec = backbone.spec
    source = spec.source
    if source == "file" and spec.checkpoint:
        source = f"file:{Path(spec.checkpoint).name}"
    return {"name": spec.name, "architecture": spec.architecture, "source": source,
            "model_kwargs": spec.model_kwargs or {}}


# ----------------------------------------------------------------------------------------------- plan
def build_plan(suite: Suite, tasks: list[Task], methods: list[str], backbone, *, cli: dict, sets: OptionSets,
               default_image_size: int, teachers: dict[str, dict] | None = None) -> Plan:
    """Every cell (task × method) with its resolved settings and the run keys of its selection runs.

    ``backbone``: the loaded :class:`~vistune.backbones.BackboneView` (its identity and family are read);
    ``cli``: the settings given as flags; ``default_image_size``: the backbone's pretrained input size,
    used where no setting gives one; ``teachers``: per task, the teacher of its ``distill:<method>`` cells
    (``{"path", "tensors_sha256"}``, read by the caller; its hash is part of their run keys)."""
    bkey = backbone_key(backbone)
    family_errors = []
    infos = {}
    for m in methods:
        info, _ = resolve_method(split_label(m)[1])  # unknown method → VistuneError with suggestions
        infos[m] = info
        if not info.supports(backbone):
            family_errors.append(f"{m} (supports {', '.join(info.families)})")
    if family_errors:
        raise VistuneError(
            f"backbone {backbone.spec.name!r} is of the {backbone.family} family, which these methods do not "
            f"support: {'; '.join(family_errors)}",
            "drop them from --methods, or use a backbone of a family they support (`vistune methods`)",
        )
    check_shared_sets(sets, methods)
    shared_settings, shared_options = _split_method_table(sets.shared, "--set")
    cells = []
    for task in tasks:
        task_settings = {**suite.defaults, **task.overrides}
        for m in methods:
            settings = dict(task_settings)
            options: dict = {}
            procedure, student = split_label(m)
            # [methods.adapter] then [methods.adapter-…] (then [methods."distill:adapter-…"])
            for label in dict.fromkeys([infos[m].name, student, m]):
                if label in suite.methods:
                    s, o = _split_method_table(suite.methods[label], f"suite [methods.{label}]")
                    settings.update(s)
                    options.update(o)
            settings.update({k: v for k, v in cli.items() if v is not None})
            settings.update(shared_settings)
            options.update(shared_options)
            s, o = _split_method_table(sets.by_method.get(m, {}), f"--set {m}.…")
            settings.update(s)
            options.update(o)
            resolved = make_config(student, options).to_dict()  # validates the options now, before any training
            key_options = {k: resolved.get(k, v) for k, v in sorted(options.items())}
            if settings["image_size"] is None:
                settings["image_size"] = default_image_size
            around = None
            if procedure is not None:
                around = _procedure_of(suite, task, procedure.name, student, teachers or {})
            cells.append(_cell(suite, task, m, key_options, settings, bkey, around))
    return Plan(suite=suite.name, suite_description=suite.description, suite_path=suite.path, backbone=bkey,
                backbone_params=backbone.num_params(),
                signature=canonical({"suite": suite.name, "backbone": bkey, "cli": cli}),
                tasks=[PlannedTask(t.name, t.group) for t in tasks], methods=list(methods), cells=cells)


def _procedure_of(suite: Suite, task: Task, name: str, student: str, teachers: dict[str, dict]) -> dict:
    """A ``distill:<method>`` cell's procedure: the suite's [distill] options (validated) and the task's teacher."""
    if task.name not in teachers:
        raise VistuneError(f"{name}:{student} on task {task.name!r}: no teacher was given",
                           'name one per task: the suite\'s [distill] teacher = "<folder>/{task}", or --teacher')
    options = {k: v for k, v in suite.distill.items() if k != "teacher"}
    settings = procedure_config(name, options).to_dict()
    return {"name": name, "method": student, "settings": settings, "teacher": dict(teachers[task.name])}


def _cell(suite: Suite, task: Task, method: str, options: dict, settings: dict, bkey: dict,
          procedure: dict | None = None) -> Cell:
    base = {
        "suite": suite.name, "task": task.name, "data": task.data, "method": method, "options": options,
        "backbone": bkey, "epochs": settings["epochs"], "batch_size": settings["batch_size"],
        "optimizer": settings["optimizer"], "warmup_epochs": settings["warmup_epochs"],
        "image_size": settings["image_size"], "normalization": settings["normalization"],
        "augment": settings["augment"], "train_size": settings["train_size"],
        "val_size": settings["val_size"], "data_seed": settings["data_seed"],
    }
    if procedure is not None:  # the teacher by its tensors' hash: a retrained teacher is another run
        base["procedure"] = {"name": procedure["name"], "settings": procedure["settings"],
                             "teacher_sha256": procedure["teacher"]["tensors_sha256"]}
    select_seed = settings["seeds"][0]
    select = [SelectRun(lr=lr, wd=wd, seed=select_seed,
                        key=canonical({**base, "phase": "select", "lr": lr, "wd": wd, "seed": select_seed}))
              for lr in settings["lr_grid"] for wd in settings["wd_grid"]]
    return Cell(task=task.name, group=task.group, method=method, options=options, settings=settings,
                select=select, seeds=list(settings["seeds"]),
                final_base={**base, "phase": "final", "test_size": settings["test_size"]}, procedure=procedure)


def choose_best(cell: Cell, rows: dict[str, dict]) -> Winner | None:
    """The selection winner from the stored rows (run key → row): best val accuracy; ties → smaller lr,
    then smaller wd. None while any selection run of the cell is missing, or when every one diverged."""
    found = [rows.get(s.key) for s in cell.select]
    if any(r is None for r in found):
        return None
    ok = [(r, s) for r, s in zip(found, cell.select) if r["status"] == "ok" and r["val_accuracy"] is not None]
    if not ok:
        return None
    r, s = min(ok, key=lambda rs: (-rs[0]["val_accuracy"], rs[1].lr, rs[1].wd))
    return Winner(lr=s.lr, wd=s.wd, val_accuracy=r["val_accuracy"])


def selection_stored(cell: Cell, rows: dict[str, dict]) -> bool:
    """Whether every selection run of the cell has a row."""
    return all(s.key in rows for s in cell.select)
