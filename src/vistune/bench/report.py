"""``vistune report DIR``: the Markdown report and the accuracy-vs-parameters plot of a bench.

Built from ``DIR/results.sqlite`` alone: the plan of the latest ``vistune bench`` on DIR (plus cells
of earlier benches with the same settings that ran other tasks or methods) joined with the stored
runs. Works on an unfinished bench too: missing cells show as pending.

Text from the suite file, the command line or the data (suite description, task groups, data specs, names)
enters the Markdown escaped (:func:`_md`, :func:`_code`): HTML is shown as text, and a ``|`` cannot end a
table cell.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import os
import re
import statistics
from pathlib import Path

from .._io import atomic_write, atomic_write_text
from ..errors import VistuneError
from .plan import Plan, PlannedTask, choose_best
from .store import STORE, Store

REPORT = "report.md"
PLOT = "accuracy_vs_params.png"
GROUP_ORDER = ("Natural", "Specialized", "Structured")


def _merged_plan(store: Store, where: Path) -> tuple[Plan, list[str]]:
    benches = store.benches()
    if not benches:
        raise VistuneError(f"{where} holds no bench results ({STORE} has no recorded bench)",
                           "run `vistune bench --out DIR …` first, then `vistune report DIR`")
    plan = Plan.from_dict(benches[0]["plan"])
    commands = [benches[0]["command"]]
    cells = {(c.task, c.method): c for c in plan.cells}
    tasks = {t.name: t for t in plan.tasks}
    methods = list(plan.methods)
    for b in benches[1:]:
        if b["plan"].get("signature") != plan.signature:
            continue
        added = False
        for c in Plan.from_dict(b["plan"]).cells:
            if (c.task, c.method) not in cells:
                cells[(c.task, c.method)] = c
                added = True
                tasks.setdefault(c.task, PlannedTask(c.task, c.group))
                if c.method not in methods:
                    methods.append(c.method)
        if added and b["command"] not in commands:
            commands.append(b["command"])
    merged = dataclasses.replace(plan, cells=list(cells.values()), tasks=list(tasks.values()), methods=methods)
    return merged, commands


def collect(out: str | Path) -> dict:
    """Everything the report shows (also handy in notebooks): the merged :class:`~vistune.bench.plan.Plan`,
    the commands that ran it, and per (task, method) its :class:`~vistune.bench.plan.Cell`, selection
    :class:`~vistune.bench.plan.Winner` and stored rows with their summary statistics."""
    out = Path(out)
    if not (out / STORE).is_file():
        raise VistuneError(f"{out} has no {STORE}", "give the --out folder of a `vistune bench` run")
    with Store(out / STORE) as store:
        plan, commands = _merged_plan(store, out)
        results = {}
        done = planned = 0
        for cell in plan.cells:
            sel_rows = store.get_many([s.key for s in cell.select])
            best = choose_best(cell, sel_rows)
            finals = []
            if best is not None:
                keys = [cell.final_key(best.lr, best.wd, s) for s in cell.seeds]
                got = store.get_many(keys)
                finals = [got[k] for k in keys if k in got]
            planned += len(cell.select) + len(cell.seeds)
            done += len(sel_rows) + len(finals)
            ok = [r for r in finals if r["status"] == "ok"]
            tests = [r["test_accuracy"] for r in ok if r["test_accuracy"] is not None]
            any_row = (ok or [r for r in sel_rows.values() if r["status"] == "ok"] or [None])[0]
            results[(cell.task, cell.method)] = {
                "cell": cell, "best": best, "select_done": len(sel_rows), "select_total": len(cell.select),
                "select_diverged": sum(r["status"] != "ok" for r in sel_rows.values()),
                "finals": finals, "final_done": len(finals), "final_total": len(cell.seeds),
                "final_diverged": sum(r["status"] != "ok" for r in finals),
                "test": tests,
                "test_mean": statistics.fmean(tests) if tests else None,
                "test_std": statistics.stdev(tests) if len(tests) > 1 else (0.0 if tests else None),
                "tuned_params": any_row["tuned_params"] if any_row else None,
                "tuned_params_excluding_head": any_row["tuned_params_excluding_head"] if any_row else None,
                "backbone_params": any_row["backbone_params"] if any_row else None,
                "artifact_bytes": statistics.fmean([r["artifact_bytes"] for r in ok]) if ok else None,
                "seconds": sum((r["wall_seconds"] or 0.0) for r in list(sel_rows.values()) + finals),
                "peak_memory_mb": max([r["peak_memory_mb"] or 0.0 for r in list(sel_rows.values()) + finals],
                                      default=None),
                "rows": list(sel_rows.values()) + finals,
            }
        meta_rows = [r for res in results.values() for r in res["rows"]]
        efficiency = [json.loads(r["result"]) | {"method": r["method"], "backbone": r["backbone"]}
                      for r in store.db.execute("SELECT * FROM efficiency ORDER BY id")
                      if r["method"] in plan.methods and r["backbone"] == plan.backbone["name"]]
    return {"plan": plan, "commands": commands, "results": results, "done": done, "planned": planned,
            "rows": meta_rows, "efficiency": efficiency}


def _groups(tasks: list[PlannedTask]) -> list[str]:
    present = list(dict.fromkeys(t.group for t in tasks))
    return [g for g in GROUP_ORDER if g in present] + [g for g in present if g not in GROUP_ORDER]


def method_summary(data: dict) -> dict[str, dict]:
    """Per method: task means, group means, overall mean, mean tuned params, total params for N tasks."""
    plan, results = data["plan"], data["results"]
    tasks = plan.tasks
    n = len(tasks)
    backbone_params = plan.backbone_params
    out = {}
    for m in plan.methods:
        cells = [results.get((t.name, m)) for t in tasks]
        means = {t.name: c["test_mean"] for t, c in zip(tasks, cells) if c and c["test_mean"] is not None}
        groups = {}
        for g in _groups(tasks):
            names = [t.name for t in tasks if t.group == g]
            vals = [means[x] for x in names if x in means]
            groups[g] = (statistics.fmean(vals) if vals else None, len(vals) < len(names))
        tuned = [c["tuned_params"] for c in cells if c and c["tuned_params"] is not None]
        excl = [c["tuned_params_excluding_head"] for c in cells if c and c["tuned_params_excluding_head"] is not None]
        bp = next((c["backbone_params"] for c in cells if c and c["backbone_params"]), None) or backbone_params
        mean_tuned = statistics.fmean(tuned) if tuned else None
        total = None
        if mean_tuned is not None and bp:
            whole = excl and statistics.fmean(excl) >= bp  # the method tunes the whole backbone (full)
            # VPT (vpt#10): parameters to serve N tasks ÷ one backbone. PETL: one shared backbone + N × tuned
            # parameters; full fine-tuning: N copies of backbone + head.
            total = (n * mean_tuned) / bp if whole else (bp + n * mean_tuned) / bp
        out[m] = {"task_means": means, "groups": groups,
                  "mean": statistics.fmean(means.values()) if means else None, "complete": len(means) == n,
                  "tuned_params": mean_tuned, "tuned_percent": 100 * mean_tuned / bp if mean_tuned and bp else None,
                  "total_params": total, "backbone_params": bp, "n_tasks": n}
    return out


# --------------------------------------------------------------------------------------------- markdown
def _md(text) -> str:
    """Text as literal Markdown on one line: HTML escaped (shown, never run), Markdown's punctuation and the
    table's ``|`` backslash-escaped."""
    return re.sub(r"([\\`*_\[\]|~#])", r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _code(text, in_table: bool = True) -> str:
    """Text as a Markdown code span (HTML inside one is shown as text); in a table its ``|`` is escaped,
    which GitHub's tables require even inside code."""
    text = " ".join(str(text).split())
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _params(n: float | None) -> str:
    if n is None:
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def _cell_text(res: dict | None) -> str:
    if res is None:
        return "–"
    if res["test_mean"] is None:
        if res["select_done"] < res["select_total"]:
            return f"selecting {res['select_done']}/{res['select_total']}"
        if res["best"] is None:
            return "diverged"
        if res["cell"].test_size is None and res["finals"] and not res["test"]:
            return "no test"
        return f"final {res['final_done']}/{res['final_total']}"
    text = f"{100 * res['test_mean']:.1f}"
    if len(res["test"]) > 1:
        text += f" ± {100 * res['test_std']:.1f}"
    if len(res["test"]) < res["final_total"]:
        text += f" ({len(res['test'])}/{res['final_total']} seeds)"
    return text


SETTINGS_SHOWN = [("image_size", "image size"), ("epochs", "epochs"), ("batch_size", "batch"),
                  ("optimizer", "optimizer"), ("lr_grid", "lr grid"), ("wd_grid", "wd grid"), ("seeds", "seeds"),
                  ("train_size", "train"), ("val_size", "val"), ("test_size", "test"),
                  ("normalization", "normalization"), ("augment", "augment")]


def _settings_text(plan: Plan) -> str:
    """Each setting once when every cell shares it, else per method (or per task × method)."""
    cells = plan.cells
    parts = []
    for key, label in SETTINGS_SHOWN:
        values = [c.settings.get(key) for c in cells]
        show = (lambda v: "all" if v is None and key.endswith("_size") and key != "image_size" else
                "method default" if v is None and key == "optimizer" else str(v))
        if not values:
            continue
        if all(v == values[0] for v in values):
            parts.append(f"{label} {show(values[0])}")
            continue
        by_method = {}
        for c in cells:
            by_method.setdefault(c.method, set()).add(json.dumps(c.settings.get(key)))
        if all(len(v) == 1 for v in by_method.values()):
            per = ", ".join(f"{m} {show(json.loads(next(iter(v))))}" for m, v in by_method.items())
            parts.append(f"{label} per method ({per})")
        else:
            parts.append(f"{label} varies by task" + (" (see the Tasks table)" if key == "test_size" else ""))
    return "; ".join(parts)


def _task_row(task: PlannedTask, results: dict, methods: list[str]) -> list[str]:
    """Split sizes as the runs saw them (from the stored data summaries)."""
    sel = fin = "–"
    data = "–"
    for m in methods:
        res = results.get((task.name, m))
        if not res:
            continue
        data = _code(res["cell"].data)
        for r in res["rows"]:
            summary = json.loads(r["config"] or "{}").get("data_summary")
            if summary and r["phase"] == "select" and sel == "–":
                sel = summary.replace(" / no test", "")
            if summary and r["phase"] == "final" and fin == "–":
                fin = summary
    return [_md(task.name), _md(task.group), data, _md(sel), _md(fin)]


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt_num(x) -> str:
    return f"{x:g}"


def render(data: dict, plot_name: str | None = PLOT) -> str:
    plan, results = data["plan"], data["results"]
    tasks, methods = plan.tasks, plan.methods
    summary = method_summary(data)
    groups = _groups(tasks)
    n = len(tasks)
    b = plan.backbone
    bp = plan.backbone_params
    rows = data["rows"]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    status = ("complete" if data["done"] == data["planned"] else
              f"**incomplete: {data['done']} of {data['planned']} runs done** (re-run the bench command to finish)")
    commits = sorted({r["git_commit"] for r in rows if r["git_commit"]})
    devices = sorted({r["device"] for r in rows if r.get("device")})
    versions = next((json.loads(r["versions"]) for r in reversed(rows) if r.get("versions")), {})
    group_counts = ", ".join(f"{g} {sum(t.group == g for t in tasks)}" for g in groups)
    out = [f"# vistune bench: {_md(plan.suite)} on {_md(b['name'])}", ""]
    if plan.suite_description:
        out += [f"_{_md(plan.suite_description)}_", ""]
    backbone = _code(b["name"], in_table=False)
    out += [
        f"- backbone: {backbone} ({_md(b['source'])}), {bp:,} parameters" if bp else f"- backbone: {backbone}",
        f"- tasks: {n} ({_md(group_counts)}); "
        f"methods: {_md(', '.join(methods))}",
        f"- status: {status}; generated {now}",
        f"- settings: {_md(_settings_text(plan))}",
        f"- command{'s' if len(data['commands']) > 1 else ''}: "
        + "; ".join(_code(c, in_table=False) for c in data["commands"]),
    ]
    if versions:
        out.append("- versions: " + _md(", ".join(f"{k} {v}" for k, v in versions.items() if k != "git_dirty" and v)
                                        + (f"; git {', '.join(c[:12] for c in commits)}" if commits else "")
                                        + (" (with local changes)" if versions.get("git_dirty") else "")
                                        + (f"; device {', '.join(devices)}" if devices else "")))
    out += [
        "",
        "Protocol (VPT): for each task × method every lr × weight decay of the grid is trained on the "
        "train subset and scored on the val subset (best epoch) — test is never used for selection; the best "
        "val accuracy wins (ties → smaller lr, then smaller wd). That setting is retrained on train + val with "
        "each seed (last epoch kept) and evaluated once on test.",
        "",
        "## Tasks",
        "",
        _table(["Task", "Group", "Data", "Selection (train / val)", "Final (train+val / val / test)"],
               [_task_row(t, results, methods) for t in tasks], ["l", "l", "l", "l", "l"]),
        "",
        "## Test top-1 accuracy (%), mean ± std over seeds",
        "",
    ]
    header = ["Method"] + [_md(t.name) for t in tasks] + [_md(g) for g in groups] + ["Mean", "Tuned params",
                                                                                        "% of backbone",
                                                                f"Total params ({n} task{'s' if n != 1 else ''})"]
    table_rows = []
    for m in methods:
        s = summary[m]
        row = [f"**{_md(m)}**"] + [_cell_text(results.get((t.name, m))) for t in tasks]
        for g in groups:
            val, partial = s["groups"][g]
            row.append("–" if val is None else f"{100 * val:.1f}{'*' if partial else ''}")
        row.append("–" if s["mean"] is None else f"{100 * s['mean']:.1f}{'' if s['complete'] else '*'}")
        row.append(_params(s["tuned_params"]))
        row.append("–" if s["tuned_percent"] is None else f"{s['tuned_percent']:.2f}%")
        row.append("–" if s["total_params"] is None else f"{s['total_params']:.2f}×")
        table_rows.append(row)
    out += [_table(header, table_rows), ""]
    out += [
        f"Group columns and Mean average the per-task means (Mean: over the {n} task(s)); `*` marks a mean over "
        "the tasks finished so far. Tuned params: trainable parameters per task including the classifier head "
        "(mean over tasks). Total params for N tasks, as the VPT paper defines it: parameters needed to serve "
        "all N tasks ÷ backbone parameters = (backbone + N × tuned per task) ÷ backbone; for methods that tune "
        "the whole backbone (full), N × (backbone + head) ÷ backbone.",
        "",
    ]
    if plot_name:
        out += [f"![mean test accuracy vs tuned parameters]({plot_name})", ""]

    out += ["## Chosen setting per task (selected on val)", "",
            "lr is the base lr (× batch/256); val is the best val top-1 (%) of the selection runs.", ""]
    rows_sel = []
    for m in methods:
        row = [f"**{_md(m)}**"]
        for t in tasks:
            res = results.get((t.name, m))
            if res is None:
                row.append("–")
            elif res["best"] is None:
                row.append("diverged" if res["select_done"] == res["select_total"] and res["select_total"]
                           else f"selecting {res['select_done']}/{res['select_total']}")
            else:
                best = res["best"]
                extra = f", {res['select_diverged']} diverged" if res["select_diverged"] else ""
                row.append(f"lr {_fmt_num(best.lr)}, wd {_fmt_num(best.wd)} "
                           f"(val {100 * best.val_accuracy:.1f}{extra})")
        rows_sel.append(row)
    out += [_table(["Method"] + [_md(t.name) for t in tasks], rows_sel), ""]

    out += ["## Artifact size per task and cost", "",
            "Artifact: `adapter.safetensors` + `adapter.json` of one final run (mean over seeds) — what must be "
            "stored per task besides the shared backbone. Runs and time: selection + final runs over all tasks.",
            ""]
    rows_art = []
    for m in methods:
        row = [f"**{_md(m)}**"]
        secs, runs, peak = 0.0, 0, 0.0
        for t in tasks:
            res = results.get((t.name, m))
            row.append("–" if not res or res["artifact_bytes"] is None else f"{res['artifact_bytes'] / 1024:,.0f} KiB")
            if res:
                secs += res["seconds"]
                runs += res["select_done"] + res["final_done"]
                peak = max(peak, res["peak_memory_mb"] or 0.0)
        row += [str(runs), f"{secs / 60:.1f} min", f"{peak:,.0f} MB" if peak else "–"]
        rows_art.append(row)
    out += [_table(["Method"] + [_md(t.name) for t in tasks] + ["Runs", "Time", "Peak memory"], rows_art), ""]
    out += ["Peak memory: peak GPU memory on CUDA; on CPU the process's peak resident memory (it includes the "
            "decoded data kept for the whole bench).", ""]

    out += _efficiency_section(data)
    out += ["## Per-seed test top-1 (%)", ""]
    rows_seed = []
    for m in methods:
        for t in tasks:
            res = results.get((t.name, m))
            if not res or not res["finals"]:
                continue
            per = ", ".join(f"{r['seed']}: " + ("diverged" if r["status"] != "ok" else
                                               "–" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.1f}")
                            for r in res["finals"])
            rows_seed.append([_md(m), _md(t.name), per])
    out += [_table(["Method", "Task", "seed: test top-1"], rows_seed, ["l", "l", "l"]) if rows_seed else
            "_no final runs yet_", ""]
    out += [f"Every run (selection and final) is a row of `{STORE}` with its full configuration.", ""]
    return "\n".join(out)


def _efficiency_section(data: dict) -> list[str]:
    """Training speed, peak memory, inference latency (one protocol for every method) and artifact bytes."""
    measured = data.get("efficiency") or []
    if not measured:
        return ["## Efficiency", "", "_not measured (the bench ran with --no-efficiency, or has not finished "
                "a run of any method yet)_", ""]
    methods = data["plan"].methods
    measured = sorted(measured, key=lambda e: (methods.index(e["method"]), e["device"]))
    rows = []
    for e in measured:
        arts = [res["artifact_bytes"] for (_, m), res in data["results"].items()
                if m == e["method"] and res["artifact_bytes"] is not None]
        rows.append([f"**{_md(e['method'])}**", _code(e["backbone"]), _md(e["device"]), _params(e["tuned_params"]),
                     f"{e['train_images_per_s']:,.1f}", f"{e['peak_memory_mb']:,.0f} MB",
                     f"{e['latency_b1_ms']:.2f}", f"{e['latency_bn_ms']:.1f}",
                     f"{statistics.fmean(arts) / 1024:,.0f} KiB" if arts else "–"])
    first = measured[0]
    kinds = sorted({e["peak_memory_kind"] for e in measured})
    batch = first["batch_size"]
    return [
        "## Efficiency", "",
        _table(["Method", "Backbone", "Device", "Tuned params", f"Train img/s (batch {batch})", "Peak memory",
                "Latency b1 (ms)", f"Latency b{batch} (ms)", "Artifact per task"], rows, ["l"] * 3 + ["r"] * 6),
        "",
        f"One protocol for every method (`vistune.bench.efficiency`): the adapted model as training builds it, "
        f"{first['image_size']} px seeded random images; train img/s from the median of {first['steps']} "
        f"SGD-momentum steps (forward, loss, backward, update) after {first['warmup']} warm-up steps, with the "
        "trainer's precision (bf16 autocast on CUDA, fp32 on CPU); latency: the median eval-mode forward without "
        "gradients at batch 1 and at the training batch. Each method is measured in a fresh process after all "
        "runs, one at a time. Peak memory: " + " / ".join(
            {"cuda-max-allocated": "CUDA max allocated during the training steps",
             "process-peak-rss": "the fresh process's peak resident memory (Python + torch baseline included)"}[k]
            for k in kinds) + ". Head-only methods are timed through the backbone; without augmentation the bench "
        "trains them on cached features, far faster. Artifact per task: mean size of the final runs' artifacts.",
        "",
    ]


# ------------------------------------------------------------------------------------------------- plot
def plot(data: dict, path: str | Path) -> Path | None:
    """Mean test accuracy vs tuned parameters per task (log x), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = method_summary(data)
    pts = [(m, s["tuned_params"], s["mean"], s["complete"]) for m, s in summary.items()
           if s["tuned_params"] and s["mean"] is not None]
    plan = data["plan"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        for m, x, y, complete in pts:
            ax.scatter([x], [100 * y], s=60, marker="o" if complete else "x", zorder=3)
            ax.annotate(m + ("" if complete else " (partial)"), (x, 100 * y), textcoords="offset points",
                        xytext=(6, 4), fontsize=9)
        ax.set_xscale("log")
        if pts:
            xs = [p[1] for p in pts]
            lo, hi = min(xs), max(xs)
            ax.set_xlim(lo / 3, hi * 3 if hi > lo else lo * 3)
            ys = [100 * p[2] for p in pts]
            pad = max(2.0, 0.15 * (max(ys) - min(ys)))
            ax.set_ylim(min(ys) - pad, min(100.0, max(ys) + pad))
        else:
            ax.text(0.5, 0.5, "no finished final runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("tuned parameters per task (incl. head, log scale)")
        ax.set_ylabel(f"mean test top-1 (%) over {len(plan.tasks)} task(s)")
        ax.set_title(f"{plan.suite} · {plan.backbone['name']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def write_report(bench_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the Markdown report (default ``DIR/report.md``) and ``DIR/accuracy_vs_params.png``."""
    bench_dir = Path(bench_dir)
    data = collect(bench_dir)
    out = Path(out) if out is not None else bench_dir / REPORT
    png = bench_dir / PLOT
    plot(data, png)
    rel = os.path.relpath(png, out.parent if str(out.parent) else ".")
    atomic_write_text(out, render(data, plot_name=rel))
    return out


__all__ = ["collect", "method_summary", "render", "plot", "write_report", "REPORT", "PLOT"]
