"""The benchmark harness: suites, the VPT-protocol sweep (selection never sees test), resume, report."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistune.bench import BenchOptions, builtin_suites, load_suite, parse_suite, run_bench
from vistune.bench import jobs as jobs_mod
from vistune.bench.plan import Plan, PlannedTask
from vistune.bench.report import method_summary
from vistune.bench.suite import parse_suite_file
from vistune.cli import main
from vistune.errors import VistuneError

METHODS = ["linear", "bias"]
LR_GRID, WD_GRID, SEEDS = [0.5, 2.0], [0.0, 1e-3], [3, 4]
N_SELECT = len(METHODS) * len(LR_GRID) * len(WD_GRID)
N_FINAL = len(METHODS) * len(SEEDS)
REAL_RUN_JOB = jobs_mod.run_job


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """The runs here are tiny: one thread avoids OpenMP overhead (conftest.one_thread)."""


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 classes × 12 train / 4 test noisy 16×16 images: a class tints one colour channel."""
    root = tmp_path_factory.mktemp("bench-data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 200, (16, 16, 3)).astype(np.uint8)
                a[..., c] = np.clip(a[..., c].astype(int) + 60, 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def _suite(data: Path):
    return parse_suite({
        "name": "tiny",
        "description": "a tiny image folder",
        "defaults": {"image_size": 32, "epochs": 1, "batch_size": 8, "lr_grid": LR_GRID, "wd_grid": WD_GRID,
                     "seeds": SEEDS, "train_size": 24, "val_size": 6},
        "tasks": [{"name": "folder", "group": "Natural", "data": str(data)}],
    })


class Counting:
    """Wraps run_job: counts calls, checks what each phase is given, can fail after k runs."""

    def __init__(self, fail_after: int | None = None, crash_after_final: bool = False):
        self.real = REAL_RUN_JOB
        self.calls = []
        self.fail_after = fail_after
        self.crash_after_final = crash_after_final

    def __call__(self, job, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated kill")
        data = kwargs["data"]
        self.calls.append((job.protocol, job.out, data.test is not None))
        if job.protocol == "train-val":
            assert data.test is None, "selection must not be given test data"
            assert job.out is None
        metrics = self.real(job, **kwargs)
        if self.crash_after_final and job.protocol == "final":
            self.crash_after_final = False
            raise RuntimeError("killed after the artifact was written, before the row was committed")
        return metrics


def _bench(suite, backbone, out, monkeypatch, runner=None):
    runner = runner or Counting()
    monkeypatch.setattr(jobs_mod, "run_job", runner)
    summary = run_bench(BenchOptions(suite, METHODS, backbone, out, device="cpu", progress=False, efficiency=False))
    return summary, runner


def _rows(out: Path, table: str = "runs") -> list[dict]:
    db = sqlite3.connect(out / "results.sqlite")
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY id")]
    db.close()
    return rows


def test_sweep_protocol_report_and_resume(image_folder, tiny_backbones, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    backbone = tiny_backbones("vit")
    summary, runner = _bench(_suite(image_folder), backbone, out, monkeypatch)
    assert summary["executed"] == N_SELECT + N_FINAL == len(runner.calls)
    rows = _rows(out)
    assert len(rows) == N_SELECT + N_FINAL
    select = [r for r in rows if r["phase"] == "select"]
    final = [r for r in rows if r["phase"] == "final"]
    assert len(select) == N_SELECT and len(final) == N_FINAL
    # selection never looks at test: no test accuracy, no test data, trained on train only
    assert all(r["test_accuracy"] is None for r in select)
    assert all(r["val_accuracy"] is not None for r in select)
    assert all(not has_test for proto, _, has_test in runner.calls if proto == "train-val")
    assert all(json.loads(r["config"])["data_summary"].startswith("24 train / 6 val / no test") for r in select)
    assert all(r["test_accuracy"] is not None for r in final)
    assert all(json.loads(r["config"])["data_summary"].startswith("30 train / 6 val / 12 test") for r in final)
    # the final runs use the best val setting (ties → smaller lr, then smaller wd), every seed
    for m in METHODS:
        cands = [r for r in select if r["method"] == m]
        best = min(cands, key=lambda r: (-r["val_accuracy"], r["lr"], r["weight_decay"]))
        fin = [r for r in final if r["method"] == m]
        assert {(r["lr"], r["weight_decay"]) for r in fin} == {(best["lr"], best["weight_decay"])}
        assert sorted(r["seed"] for r in fin) == SEEDS
        for r in fin:  # artifacts are kept, and their size is recorded
            run_dir = out / r["artifact_dir"]
            assert run_dir == out / "runs" / "folder" / m / f"seed{r['seed']}"
            assert (run_dir / "adapter.safetensors").is_file()
            assert r["artifact_bytes"] > 0 and r["tuned_params"] > 0 and r["backbone_params"] == backbone.num_params()
    assert len({r["run_key"] for r in rows}) == len(rows)
    # the report: the table with every method, the total-params column and a real PNG
    text = (out / "report.md").read_text()
    assert "Total params (1 task)" in text
    assert "| folder | Natural |" in text and "30 train / 6 val / 12 test, 3 classes" in text
    for m in METHODS:
        assert f"| **{m}** |" in text
    assert (out / "accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # re-running the same command redoes nothing
    summary2, runner2 = _bench(_suite(image_folder), backbone, out, monkeypatch)
    assert summary2["executed"] == 0 and runner2.calls == []
    assert _rows(out) == rows

    # `vistune report DIR --out FILE` from the command line
    assert main(["report", str(out), "--out", str(tmp_path / "r.md")]) == 0
    assert "| **bias** |" in (tmp_path / "r.md").read_text()


def test_progress_shows_the_sweep_and_each_run_with_its_steps(image_folder, tiny_backbones, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    bars, steps = [], []

    def recording_run_job(job, **kwargs):
        bar = kwargs["on_step"]
        bars.append(bar)
        return REAL_RUN_JOB(job, **{**kwargs, "on_step": lambda done, total: (bar(done, total),
                                                                              steps.append((done, total)))})

    monkeypatch.setattr(jobs_mod, "run_job", recording_run_job)
    text = io.StringIO()
    run_bench(BenchOptions(_suite(image_folder), ["linear"], tiny_backbones("vit"), tmp_path / "b", device="cpu",
                           efficiency=False), console=Console(file=text, force_terminal=True, width=200))
    assert len(bars) == len(LR_GRID) * len(WD_GRID) + len(SEEDS) and all(callable(b) for b in bars)
    assert steps[:3] == [(1, 3), (2, 3), (3, 3)]  # 24 images / batch 8 = 3 steps in the run's one epoch
    out = text.getvalue()
    assert "bench" in out and "runs" in out and "steps" in out and "select folder/linear" in out


def test_interrupted_sweep_completes_without_duplicates(image_folder, tiny_backbones, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    backbone = tiny_backbones("vit")
    k = N_SELECT + 1  # killed during the final phase
    with pytest.raises(RuntimeError, match="simulated kill"):
        _bench(_suite(image_folder), backbone, out, monkeypatch, Counting(fail_after=k))
    assert len(_rows(out)) == k
    before = {r["run_key"]: r["finished_at"] for r in _rows(out)}
    summary, runner = _bench(_suite(image_folder), backbone, out, monkeypatch)
    assert summary["executed"] == len(runner.calls) == N_SELECT + N_FINAL - k
    rows = _rows(out)
    assert len(rows) == N_SELECT + N_FINAL == len({r["run_key"] for r in rows})
    assert all(before[r["run_key"]] == r["finished_at"] for r in rows if r["run_key"] in before)


def test_run_finished_but_not_recorded_is_recovered(image_folder, tiny_backbones, tmp_path, monkeypatch):
    """Killed after a final run wrote its artifact but before its row was committed: not trained again."""
    out = tmp_path / "bench"
    backbone = tiny_backbones("vit")
    suite = _suite(image_folder)
    with pytest.raises(RuntimeError, match="before the row was committed"):
        _bench(suite, backbone, out, monkeypatch, Counting(crash_after_final=True))
    assert len(_rows(out)) == N_SELECT
    _, runner = _bench(suite, backbone, out, monkeypatch)
    assert len(runner.calls) == N_FINAL - 1  # the crashed run's metrics.json was read back instead
    assert len(_rows(out)) == N_SELECT + N_FINAL


def test_final_run_killed_mid_training_resumes_from_its_checkpoint(image_folder, tiny_backbones, tmp_path,
                                                                   monkeypatch):
    from vistune.training import trainer

    out = tmp_path / "bench"
    backbone = tiny_backbones("vit")
    real_evaluate = trainer.evaluate
    calls = []

    def evaluate_then_die(*args, **kwargs):  # epoch 1's checkpoint is written, epoch 2 is killed
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    def runner(job, **kwargs):
        if job.protocol == "final":
            monkeypatch.setattr(trainer, "evaluate", evaluate_then_die)
        return REAL_RUN_JOB(job, **kwargs)

    kw = dict(lr_grid=[1.0], wd_grid=[0.0], seeds=[3], sets=["linear.epochs=2"], progress=False)
    monkeypatch.setattr(jobs_mod, "run_job", runner)
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchOptions(_suite(image_folder), ["linear"], backbone, out, **kw))
    run_dir = out / "runs" / "folder" / "linear" / "seed3"
    assert (run_dir / "train_state.pt").is_file() and not (run_dir / "metrics.json").exists()
    epochs_evaluated = []
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: epochs_evaluated.append(1) or real_evaluate(*a, **k))
    monkeypatch.setattr(jobs_mod, "run_job", REAL_RUN_JOB)
    run_bench(BenchOptions(_suite(image_folder), ["linear"], backbone, out, **kw))
    assert len(epochs_evaluated) == 1  # only epoch 2 was trained again
    final = [r for r in _rows(out) if r["phase"] == "final"]
    assert len(final) == 1 and final[0]["test_accuracy"] is not None
    assert [h["epoch"] for h in json.loads(final[0]["config"])["history"]] == [1, 2]
    assert (run_dir / "adapter.json").is_file() and not (run_dir / "train_state.pt").exists()  # finished


def test_changed_settings_are_new_runs(image_folder, tiny_backbones, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    backbone = tiny_backbones("vit")
    monkeypatch.setattr(jobs_mod, "run_job", Counting())
    run_bench(BenchOptions(_suite(image_folder), ["linear"], backbone, out, lr_grid=[1.0], wd_grid=[0.0], seeds=[3],
                           progress=False, report=False))
    runner = Counting()
    monkeypatch.setattr(jobs_mod, "run_job", runner)
    s = run_bench(BenchOptions(_suite(image_folder), ["linear"], backbone, out, lr_grid=[1.0], wd_grid=[0.0],
                               seeds=[3], sets=["linear.epochs=2"], progress=False))
    assert s["executed"] == 2 and len(runner.calls) == 2  # other epochs: other run keys
    assert len(_rows(out)) == 4
    assert list((out / "runs" / "folder" / "linear").glob("seed3.superseded-1"))  # the old artifact is kept
    assert "| **linear** |" in (out / "report.md").read_text()


def test_cli_bench_with_suite_file(image_folder, tmp_path, capsys):
    """`vistune bench --suite FILE.toml …` end to end (a random-init ResNet: no model kwargs needed)."""
    suite = tmp_path / "my-suite.toml"
    suite.write_text(f'''
name = "my-suite"
description = "one folder task"
[defaults]
image_size = 32
epochs = 1
batch_size = 8
lr_grid = [1.0]
wd_grid = [0.0]
seeds = [5]
train_size = 24
val_size = 6
[[tasks]]
name = "folder"
group = "Specialized"
data = "{image_folder}"
''')
    out = tmp_path / "bench"
    argv = ["bench", "--suite", str(suite), "--methods", "linear", "--backbone", "resnet10t", "--random-init",
            "--out", str(out), "--lr-grid", "0.5,1", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    rows = _rows(out)
    assert sorted(r["phase"] for r in rows) == ["final", "select", "select"]
    assert {r["lr"] for r in rows if r["phase"] == "select"} == {0.5, 1.0}  # --lr-grid beats the suite's
    assert all(r["task_group"] == "Specialized" and r["backbone"] == "resnet10t" for r in rows)
    text = (out / "report.md").read_text()
    assert "| **linear** |" in text
    # the efficiency table: measured once per method after the runs, in a fresh process
    eff = _rows(out, "efficiency")
    assert len(eff) == 1 and eff[0]["method"] == "linear" and eff[0]["backbone"] == "resnet10t"
    e = json.loads(eff[0]["result"])
    assert e["device"] == "cpu" and e["batch_size"] == 8 and e["image_size"] == 32 and e["process"] == "fresh"
    assert e["train_images_per_s"] > 0 and e["latency_b1_ms"] > 0 and e["peak_memory_mb"] > 0
    assert e["tuned_params"] == rows[0]["tuned_params"]  # the same model as the runs: backbone frozen, same head
    assert "## Efficiency" in text and "| **linear** | `resnet10t` | cpu | 1.5k |" in text
    assert main(argv) == 0 and len(_rows(out)) == 3 and len(_rows(out, "efficiency")) == 1  # resumed: nothing new
    assert main(argv[:-1] + ["--no-efficiency", "--quiet", "--out", str(tmp_path / "b2")]) == 0
    assert _rows(tmp_path / "b2", "efficiency") == [] and "_not measured" in (tmp_path / "b2" / "report.md").read_text()


# ------------------------------------------------------------------------------------------- suites
def test_builtin_suites():
    assert {"offline-mini", "vtab-1k", "fgvc"} <= set(builtin_suites())
    vtab = load_suite("vtab-1k")
    groups = [t.group for t in vtab.tasks]
    assert len(vtab.tasks) == 19 and (groups.count("Natural"), groups.count("Specialized"),
                                      groups.count("Structured")) == (7, 4, 8)
    assert vtab.defaults["lr_grid"] == sorted([50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05])
    assert vtab.defaults["seeds"] == [42, 44, 82, 100, 800] and vtab.defaults["normalization"] == "paper"
    assert all(t.data == f"{{root}}/{t.name}" for t in vtab.tasks)
    mini = load_suite("offline-mini")
    assert [t.name for t in mini.tasks] == ["fashion-mnist", "mnist5k", "digits"]
    assert mini.tasks[0].overrides["test_size"] == 2000 and mini.defaults["train_size"] == 800
    fgvc = load_suite("fgvc")
    assert len(fgvc.tasks) == 5 and fgvc.defaults["augment"] is True and fgvc.defaults["train_size"] is None


def test_unknown_suite_and_missing_data_root():
    with pytest.raises(VistuneError, match="offline-mini"):
        load_suite("offline-mimi")
    with pytest.raises(VistuneError, match="NOAH") as e:
        run_bench(BenchOptions("vtab-1k", ["linear"], "never-loaded", "unused-out"))
    assert "vistune data vtab --download" in e.value.fix
    with pytest.raises(VistuneError, match="caltech101"):
        run_bench(BenchOptions("vtab-1k", ["linear"], "never-loaded", "unused-out", data_root="."))
    with pytest.raises(VistuneError, match="Did you mean 'linear'"):
        run_bench(BenchOptions("offline-mini", ["linea"], "never-loaded", "unused-out"))
    assert not Path("unused-out").exists()


@pytest.mark.parametrize("text,match", [
    ('name = "x"\n[defaults\nepochs = 3\n', "not valid TOML"),
    ('name = "x"\n[defaults]\nepoch = 3\n[[tasks]]\nname="a"\ngroup="N"\ndata="digits"\n', "Did you mean 'epochs'"),
    ('name = "x"\n[defaults]\nlr_grid = 0.1\n[[tasks]]\nname="a"\ngroup="N"\ndata="digits"\n', "lr_grid"),
    ('name = "x"\n', "no \\[\\[tasks\\]\\]"),
    ('name = "x"\n[[tasks]]\nname="a"\ndata="digits"\n', "group"),
    ('name = "x"\n[[tasks]]\nname="a"\ngroup="N"\ndata="digits"\n[[tasks]]\nname="a"\ngroup="N"\ndata="d"\n',
     "appears twice"),
    ('name = "x"\n[methods.bias]\nimage_size = 3\n[[tasks]]\nname="a"\ngroup="N"\ndata="digits"\n',
     "per-task setting"),
])
def test_suite_file_errors(tmp_path, text, match):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(VistuneError, match=match):
        parse_suite_file(path)
    with pytest.raises(VistuneError):
        load_suite(str(path))


def test_cli_errors(tmp_path, capsys):
    assert main(["bench", "--suite", "vtab1k", "--methods", "linear", "--backbone", "x", "--out",
                 str(tmp_path / "o")]) == 2
    assert "Did you mean 'vtab-1k'" in capsys.readouterr().err
    assert main(["bench", "--suite", "offline-mini", "--methods", "linear", "--backbone", "x", "--out",
                 str(tmp_path / "o"), "--lr-grid", "a,b"]) == 2
    assert "--lr-grid" in capsys.readouterr().err
    assert main(["bench", "--suite", "offline-mini", "--methods", "linear", "--backbone", "x", "--out",
                 str(tmp_path / "o"), "--set", "bias.reduction=8"]) == 2
    assert "not in --methods" in capsys.readouterr().err
    assert main(["bench", "--suite", "offline-mini", "--methods", "linear", "--backbone", "x", "--out",
                 str(tmp_path / "o"), "--gpus-per-run", "0.5"]) == 2
    assert "--gpus-per-run only applies to runs on Ray" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "results.sqlite" in capsys.readouterr().err


def test_total_params_follows_vpt_definition():
    """(backbone + N × tuned) ÷ backbone; full fine-tuning: N × (backbone + head) ÷ backbone (vpt#10)."""
    tasks = [PlannedTask(f"t{i}", "Natural") for i in range(24)]
    B = 85_800_000

    def res(tuned, excl):
        return {"test_mean": 0.5, "tuned_params": tuned, "tuned_params_excluding_head": excl, "backbone_params": B}

    results = {}
    for t in tasks:
        results[(t.name, "linear")] = res(76_900, 0)
        results[(t.name, "full")] = res(B + 76_900, B)
    plan = Plan(suite="s", suite_description="", suite_path=None, backbone={"name": "vit"}, backbone_params=B,
                signature=None, tasks=tasks, methods=["linear", "full"], cells=[])
    s = method_summary({"plan": plan, "results": results})
    assert s["full"]["total_params"] == pytest.approx(24 * (B + 76_900) / B)  # ≈ 24.02×
    assert s["linear"]["total_params"] == pytest.approx((B + 24 * 76_900) / B)  # ≈ 1.02×
    assert round(s["full"]["total_params"], 2) == 24.02 and round(s["linear"]["total_params"], 2) == 1.02


# ------------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance on this machine (2 CPUs) for the module's tests; Ray's local_mode no longer exists."""
    ray = pytest.importorskip("ray", reason="pip install 'vistune[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_sweep_on_ray_equals_the_in_process_sweep_and_resumes(local_ray, image_folder, tiny_backbones, tmp_path,
                                                              monkeypatch):
    backbone = tiny_backbones("vit")
    local, _ = _bench(_suite(image_folder), backbone, tmp_path / "local", monkeypatch)
    monkeypatch.undo()
    # a bench killed after some selection runs, continued on Ray
    with pytest.raises(RuntimeError, match="simulated kill"):
        _bench(_suite(image_folder), backbone, tmp_path / "ray", monkeypatch, Counting(fail_after=3))
    monkeypatch.undo()
    summary = run_bench(BenchOptions(_suite(image_folder), METHODS, backbone, tmp_path / "ray", device="cpu",
                                     progress=False, executor="ray", efficiency=False))
    assert summary["executed"] == N_SELECT + N_FINAL - 3 and summary["already_stored"] == 3
    on_ray, in_process = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert len(on_ray) == len({r["run_key"] for r in on_ray}) == N_SELECT + N_FINAL
    # the same runs with the same results: seeded runs are deterministic across processes
    by_key = {r["run_key"]: r for r in in_process}
    for r in on_ray:
        twin = by_key[r["run_key"]]
        assert r["status"] == twin["status"]
        assert r["val_accuracy"] == pytest.approx(twin["val_accuracy"], abs=1e-6)
        assert r["test_accuracy"] == twin["test_accuracy"] or r["test_accuracy"] == pytest.approx(
            twin["test_accuracy"], abs=1e-6)
        if r["phase"] == "final":  # written by a Ray worker into the bench folder
            assert (tmp_path / "ray" / r["artifact_dir"] / "adapter.safetensors").is_file()
    assert "| **bias** |" in (tmp_path / "ray" / "report.md").read_text()
    # nothing is left to run, on either executor
    assert run_bench(BenchOptions(_suite(image_folder), METHODS, backbone, tmp_path / "ray", device="cpu",
                                  progress=False, executor="ray", efficiency=False))["executed"] == 0


def test_ray_executor_without_ray_says_how_to_install(image_folder, tiny_backbones, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(VistuneError, match=r"vistune\[ray\]"):
        run_bench(BenchOptions(_suite(image_folder), METHODS, tiny_backbones("vit"), tmp_path / "b", device="cpu",
                               progress=False, executor="ray"))
    assert not (tmp_path / "b" / "results.sqlite").exists()


# ------------------------------------------------------------------------------- output for a person
def test_without_a_terminal_a_long_run_prints_heartbeat_lines_not_bars(image_folder, tiny_backbones, tmp_path,
                                                                       monkeypatch):
    """CI logs / a pipe: no bar can show, so a heartbeat line (here: every step) and the per-run lines do."""
    import io

    from vistune.bench.progress import SweepDisplay
    from vistune.output import OutputConsole

    monkeypatch.setattr(SweepDisplay, "heartbeat_seconds", 0.0)
    text = io.StringIO()
    run_bench(BenchOptions(_suite(image_folder), ["linear"], tiny_backbones("vit"), tmp_path / "b", device="cpu",
                           lr_grid=[1.0], wd_grid=[0.0], seeds=[3], efficiency=False),
              console=OutputConsole(file=text))
    out = text.getvalue()
    assert "  … select folder/linear" in out and ": step 3/3 (" in out  # 24 images / batch 8
    assert "  … final  folder/linear" in out
    assert "━" not in out and "ETA" in out  # no bar drawn; the per-run lines carry the ETA
    quiet = io.StringIO()
    run_bench(BenchOptions(_suite(image_folder), ["linear"], tiny_backbones("vit"), tmp_path / "q", device="cpu",
                           lr_grid=[1.0], wd_grid=[0.0], seeds=[3], efficiency=False, progress=False),
              console=OutputConsole(file=quiet))
    assert "…" not in quiet.getvalue().replace("loading backbone", "")


def test_report_escapes_suite_text_in_markdown_and_html(image_folder, tiny_backbones, tmp_path):
    """A suite's description, group and data spec are the user's text: `|` cannot break a table, `<script>`
    is shown as text, markup characters stay literal."""
    import re
    import shutil

    data = tmp_path / "a|b_data"
    shutil.copytree(image_folder, data)
    suite = parse_suite({
        "name": "odd", "description": "<script>alert(1)</script> *bold* | pipe",
        "defaults": {"image_size": 32, "epochs": 1, "batch_size": 8, "lr_grid": [1.0], "wd_grid": [0.0],
                     "seeds": [3], "train_size": 24, "val_size": 6},
        "tasks": [{"name": "folder", "group": "Nat|ural <b>", "data": str(data)}],
    })
    run_bench(BenchOptions(suite, ["linear"], tiny_backbones("vit"), tmp_path / "b", device="cpu", progress=False,
                           efficiency=False))
    text = (tmp_path / "b" / "report.md").read_text()
    assert "<script>" not in text and "<b>" not in text
    assert "_&lt;script&gt;alert(1)&lt;/script&gt; \\*bold\\* \\| pipe_" in text
    for line in text.splitlines():  # every table row has as many unescaped cell separators as its header
        if line.startswith("| Task | Group"):
            header = len(re.findall(r"(?<!\\)\|", line))
        if line.startswith("| folder |"):
            assert len(re.findall(r"(?<!\\)\|", line)) == header
            assert "Nat\\|ural &lt;b&gt;" in line and f"`{str(data).replace('|', chr(92) + '|')}`" in line
