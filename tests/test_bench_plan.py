"""The typed bench plan (vistune.bench.plan): settings resolution, the stored JSON form, and stores written
before the plan was typed (plain dicts), which must still report and resume."""
from __future__ import annotations

import json

import pytest
from conftest import TINY

from vistune.bench import BenchOptions, Store, collect, parse_suite, run_bench
from vistune.bench.jobs import default_image_size
from vistune.bench.plan import Cell, Plan, PlannedTask, SelectRun, Winner, build_plan, choose_best
from vistune.errors import VistuneError
from vistune.options import parse_sets

DEFAULTS = {"image_size": 32, "epochs": 1, "batch_size": 8, "lr_grid": [0.5, 1.0], "wd_grid": [0.0], "seeds": [3],
            "train_size": 24, "val_size": 6}


def _suite(**extra):
    return parse_suite({"name": "old", "description": "written by hand", "defaults": DEFAULTS,
                        "tasks": [{"name": "digits", "group": "Natural", "data": "digits"}], **extra})


def _plan(backbone, methods, pairs=(), suite=None, cli=None) -> Plan:
    suite = suite or _suite()
    return build_plan(suite, suite.tasks, methods, backbone, cli=cli or {}, sets=parse_sets(pairs, methods),
                      default_image_size=default_image_size(backbone))


def test_plan_round_trips_through_its_stored_json(tiny_backbones):
    suite = _suite(methods={"adapter": {"reduction": 4}})
    plan = _plan(tiny_backbones("vit"), ["linear", "adapter"], ["adapter.epochs=2"], suite, cli={"seeds": [3, 4]})
    stored = json.loads(json.dumps(plan.to_dict()))  # as Store.add_bench writes it and Store.benches reads it
    assert Plan.from_dict(stored) == plan
    assert [type(c) for c in plan.cells] == [Cell, Cell] and isinstance(plan.cells[0].select[0], SelectRun)
    adapter = plan.cells[1]
    assert (adapter.options, adapter.settings["epochs"], adapter.seeds) == ({"reduction": 4}, 2, [3, 4])
    assert [(s.lr, s.wd, s.seed) for s in adapter.select] == [(0.5, 0.0, 3), (1.0, 0.0, 3)]
    assert adapter.data == "digits" and adapter.test_size is None
    assert plan.tasks == [PlannedTask("digits", "Natural")]
    assert plan.backbone_params == tiny_backbones("vit").num_params()


def test_bare_sets_apply_to_every_method_and_method_sets_win(tiny_backbones):
    plan = _plan(tiny_backbones("vit"), ["linear", "bias"], ["epochs=3", "bias.epochs=5", "lr_grid=0.1"])
    settings = {c.method: c.settings for c in plan.cells}
    assert (settings["linear"]["epochs"], settings["bias"]["epochs"]) == (3, 5)
    assert settings["linear"]["lr_grid"] == settings["bias"]["lr_grid"] == [0.1]
    # a bare method option that only some methods have: refused, with the prefixed pairs to use instead
    with pytest.raises(VistuneError, match="linear has no option 'reduction'") as e:
        _plan(tiny_backbones("vit"), ["linear", "adapter"], ["reduction=8"])
    assert e.value.fix.endswith("--set adapter.reduction=8")
    with pytest.raises(VistuneError, match="per-task setting"):
        _plan(tiny_backbones("vit"), ["linear"], ["image_size=64"])


def test_choose_best_breaks_ties_by_smaller_lr_then_wd():
    cell = Cell(task="t", group="g", method="linear", options={}, settings={}, seeds=[1], final_base={},
                select=[SelectRun(lr, wd, 1, f"{lr}/{wd}") for lr in (0.5, 1.0) for wd in (0.0, 0.1)])
    rows = {s.key: {"status": "ok", "val_accuracy": 0.5} for s in cell.select}
    rows["1.0/0.0"]["val_accuracy"] = 0.9
    assert choose_best(cell, rows) == Winner(lr=1.0, wd=0.0, val_accuracy=0.9)
    rows["1.0/0.0"]["val_accuracy"] = 0.5
    assert choose_best(cell, rows) == Winner(lr=0.5, wd=0.0, val_accuracy=0.5)
    assert choose_best(cell, {k: v for k, v in rows.items() if k != "0.5/0.1"}) is None  # selection unfinished
    assert choose_best(cell, {k: {"status": "diverged", "val_accuracy": None} for k in rows}) is None


def test_an_unreadable_stored_plan_is_a_vistune_error():
    with pytest.raises(VistuneError, match="stored bench plan"):
        Plan.from_dict({"suite": "x", "backbone": {}, "tasks": [], "methods": ["linear"], "cells": [{"task": "t"}]})


# ------------------------------------------------------------------------ a store in the old (dict) form
def _key(obj) -> str:
    """A run key exactly as results.sqlite holds them: JSON with sorted keys and no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _old_store(out, arch, model_kwargs):
    """results.sqlite as the plain-dict plan code wrote it: one bench of linear on digits, its 2 selection runs
    and its 1 final run done. Everything literal: the plan's JSON and the run keys are the stored format."""
    backbone = {"name": arch, "architecture": arch, "source": "random-init", "model_kwargs": model_kwargs}
    # optimizer "sgd": the suites' default since the methods' own defaults moved to AdamW (stores from before
    # hold None there, so their runs train again)
    settings = {"image_size": 32, "epochs": 1, "batch_size": 8, "optimizer": "sgd", "warmup_epochs": None,
                "lr_grid": [0.5, 1.0], "wd_grid": [0.0], "seeds": [3], "train_size": 24, "val_size": 6,
                "test_size": None, "normalization": "pretrained_cfg", "augment": False, "data_seed": 0}
    base = {"suite": "old", "task": "digits", "data": "digits", "method": "linear", "options": {},
            "backbone": backbone, "epochs": 1, "batch_size": 8, "optimizer": "sgd", "warmup_epochs": None,
            "image_size": 32, "normalization": "pretrained_cfg", "augment": False, "train_size": 24, "val_size": 6,
            "data_seed": 0}
    select = [{"lr": lr, "wd": 0.0, "seed": 3, "key": _key({**base, "phase": "select", "lr": lr, "wd": 0.0, "seed": 3})}
              for lr in (0.5, 1.0)]
    final_base = {**base, "phase": "final", "test_size": None}
    plan = {"suite": "old", "suite_description": "written by hand", "suite_path": "<suite>", "backbone": backbone,
            "backbone_params": 32224, "signature": _key({"suite": "old", "backbone": backbone, "cli": {}}),
            "tasks": [{"name": "digits", "group": "Natural"}], "methods": ["linear"],
            "cells": [{"task": "digits", "group": "Natural", "method": "linear", "options": {}, "settings": settings,
                       "select": select, "seeds": [3], "final_base": final_base}]}
    common = {"suite": "old", "task": "digits", "task_group": "Natural", "method": "linear", "seed": 3,
              "weight_decay": 0.0, "status": "ok", "backbone": arch, "tuned_params": 330, "backbone_params": 32224,
              "wall_seconds": 1.0}
    with Store(out / "results.sqlite") as store:
        store.add_bench("2025-01-01T00:00:00+00:00", "vistune bench --suite old …", plan)
        for sel, val in zip(select, (0.5, 0.7)):
            store.insert({**common, "run_key": sel["key"], "phase": "select", "lr": sel["lr"], "val_accuracy": val,
                          "config": json.dumps({"data_summary": "24 train / 6 val / no test, 10 classes"})})
        store.insert({**common, "run_key": _key({**final_base, "lr": 1.0, "wd": 0.0, "seed": 3}), "phase": "final",
                      "lr": 1.0, "val_accuracy": 0.75, "test_accuracy": 0.8125, "artifact_bytes": 4096,
                      "artifact_dir": "runs/digits/linear/seed3",
                      "config": json.dumps({"data_summary": "30 train / 6 val / 1797 test, 10 classes"})})


def test_a_store_written_with_dict_plans_still_reports_and_resumes(tiny_backbones, tmp_path, one_thread):
    out = tmp_path / "old-bench"
    arch, model_kwargs = TINY["vit"]
    _old_store(out, arch, json.loads(json.dumps(model_kwargs)))

    data = collect(out)
    assert isinstance(data["plan"], Plan) and data["done"] == data["planned"] == 3
    res = data["results"][("digits", "linear")]
    assert res["best"] == Winner(lr=1.0, wd=0.0, val_accuracy=0.7) and res["test_mean"] == 0.8125

    # the same bench run again with this vistune: the same run keys, so nothing is trained again
    summary = run_bench(BenchOptions(_suite(), ["linear"], tiny_backbones("vit"), out, device="cpu", progress=False,
                                     efficiency=False))
    assert (summary["executed"], summary["already_stored"], summary["planned"]) == (0, 3, 3)
    with Store(out / "results.sqlite") as store:
        benches = store.benches()
    assert len(benches) == 2 and benches[0]["plan"] == benches[1]["plan"]  # the new plan stores as the old did
    text = (out / "report.md").read_text()
    assert "| **linear** | 81.2 |" in text and "lr 1, wd 0 (val 70.0)" in text and "status: complete" in text
