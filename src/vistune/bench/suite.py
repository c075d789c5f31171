"""Benchmark suites: small declarative TOML files (see ``src/vistune/suites/*.toml``).

A suite names its tasks (each a vistune data spec, optionally ``{root}/<task>``), their groups
(e.g. Natural / Specialized / Structured) and the protocol defaults: image size, epochs, batch size,
optimizer, the lr × weight-decay grid searched on train/val, the seeds of the final runs, and the
train/val/test sizes. Tasks and methods may override the defaults. ``--suite`` takes a built-in
suite name or the path of a ``.toml`` file (copy a built-in one to start).

Precedence, lowest first: ``[defaults]`` < the task's own keys < ``[methods.<name>]`` (epochs,
batch_size, optimizer, warmup_epochs, lr_grid, wd_grid; any other key there is a method option)
< command-line flags (``--epochs``, ``--lr-grid``, …) < ``--set <key>=<value>`` (every method) <
``--set <method>.<key>=<value>`` (see :mod:`vistune.options` and :mod:`vistune.bench.plan`).

Distillation (the remapping family's procedure, :mod:`vistune.methods.procedures`): a method label
``distill:<method>`` in ``--methods`` trains ``<method>`` by knowledge distillation from a teacher artifact per
task, named by the suite's ``[distill]`` table — ``teacher = "teachers/{task}"`` (``{task}``: the task's name,
``{root}``: the data root; ``vistune bench --teacher`` overrides it) — beside the distillation options
(``temperature``, ``alpha``, ``feature_loss``, ``feature_weight``; see ``vistune methods --details``).
A relative folder in ``data`` is relative to the working directory; ``{root}`` is replaced by
``--data-root`` (or the suite's ``root``).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import VistuneError, suggest
from ..methods.procedures import DistillConfig, procedure_config

try:  # Python ≥ 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

SUITE_FORMAT = "vistune bench suite"

# key → (type check, help). "all" for a size means: use every image of that split.
SETTINGS: dict[str, str] = {
    "image_size": "input resolution (int); omit for the backbone's pretrained size",
    "epochs": "training epochs of every run (int)",
    "batch_size": "batch size (int); the lr is scaled by batch/256 as in VPT",
    "optimizer": '"sgd" (the default: VPT\'s protocol, whose lr grids are SGD base lrs) or "adamw"',
    "warmup_epochs": "linear warm-up epochs (int); omit for 10% of epochs",
    "lr_grid": "base learning rates searched on train/val (list of numbers)",
    "wd_grid": "weight decays searched on train/val (list of numbers)",
    "seeds": "seeds of the final runs on train+val (list of ints); the first also seeds selection",
    "train_size": 'stratified training subset (int, VTAB-1k: 800) or "all"',
    "val_size": 'stratified validation subset (int, VTAB-1k: 200) or "all"',
    "test_size": 'fixed stratified test subset (int) or "all" (the default)',
    "normalization": '"pretrained_cfg" (the backbone\'s mean/std) or "paper" (ImageNet mean/std, as VPT)',
    "augment": "FGVC-style random-resized-crop + flip during training (bool; VTAB: false)",
    "data_seed": "seed of the stratified train/val/test subsets (int; the same for every run)",
}
DEFAULTS: dict[str, object] = {
    "image_size": None, "epochs": 10, "batch_size": 32, "optimizer": "sgd", "warmup_epochs": None,
    "lr_grid": [0.5, 1.0], "wd_grid": [0.0], "seeds": [42, 44, 82], "train_size": 800, "val_size": 200,
    "test_size": None, "normalization": "pretrained_cfg", "augment": False, "data_seed": 0,
}
# what a method may override (settings that do not change the data a task is loaded with)
METHOD_SETTINGS = ("epochs", "batch_size", "optimizer", "warmup_epochs", "lr_grid", "wd_grid")
TOP_KEYS = ("name", "description", "root", "root_help", "defaults", "tasks", "methods", "distill")
TASK_KEYS = ("name", "group", "data")
ROOT_PLACEHOLDER = "{root}"


@dataclass
class Task:
    name: str
    group: str
    data: str  # data spec; may contain {root}
    overrides: dict = field(default_factory=dict)

    def needs_root(self) -> bool:
        return ROOT_PLACEHOLDER in self.data


@dataclass
class Suite:
    name: str
    description: str
    defaults: dict
    tasks: list[Task]
    methods: dict[str, dict] = field(default_factory=dict)  # per-method setting overrides
    root: str | None = None
    root_help: str | None = None  # how to get the data, shown when the root is missing
    path: str | None = None  # where it was read from
    distill: dict = field(default_factory=dict)  # [distill]: teacher (a path template) and distillation options

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def select_tasks(self, names: list[str] | None) -> list[Task]:
        if not names:
            return list(self.tasks)
        known = {t.name: t for t in self.tasks}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise VistuneError(
                f"suite {self.name!r} has no task {unknown[0]!r}.{suggest(unknown[0], known)}",
                f"its tasks are: {', '.join(known)}",
            )
        return [known[n] for n in dict.fromkeys(names)]

    def data_spec(self, task: Task, root: str | None) -> str:
        if not task.needs_root():
            return task.data
        return task.data.replace(ROOT_PLACEHOLDER, str(Path(root).expanduser()).rstrip("/"))


# ----------------------------------------------------------------------------------------- lookup
def builtin_suites() -> dict[str, Path]:
    """Built-in suite name → its TOML file inside the package."""
    folder = resources.files("vistune") / "suites"
    out = {}
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # pragma: no cover - broken install
        return out
    for entry in entries:
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name (``offline-mini``, ``vtab-1k``, ``fgvc``) or a ``.toml`` file."""
    text = str(name_or_path)
    builtin = builtin_suites()
    if text in builtin:
        return parse_suite_file(builtin[text])
    path = Path(text).expanduser()
    if path.is_file():
        return parse_suite_file(path)
    if path.suffix == ".toml" or "/" in text or path.is_dir():
        where = "is a folder, not a .toml file" if path.is_dir() else "does not exist"
        raise VistuneError(f"suite file {text} {where}",
                           "give the path of a suite .toml file, or a built-in suite: " + ", ".join(builtin))
    raise VistuneError(
        f"unknown suite {text!r}.{suggest(text, builtin)}",
        f"use a built-in suite ({', '.join(builtin)}) or the path of a .toml file "
        f"(copy one from {Path(str(resources.files('vistune') / 'suites'))} to start)",
    )


def parse_suite_file(path: str | Path) -> Suite:
    path = Path(path)
    if tomllib is None:  # pragma: no cover
        raise VistuneError("reading suite files needs tomllib (Python ≥ 3.11) or the tomli package",
                           "pip install tomli, or use Python 3.11+")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise VistuneError(f"suite file {path} is not valid TOML: {e}",
                           "fix the syntax at that line (strings need quotes, lists are [a, b])") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VistuneError(f"cannot read suite file {path}: {e}", "check the path and that it is UTF-8 text") from None
    return parse_suite(raw, where=str(path))


# ------------------------------------------------------------------------------------- validation
def _err(where: str, what: str, fix: str) -> VistuneError:
    return VistuneError(f"{where}: {what}", fix)


def _check_keys(table: dict, allowed, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise _err(where, f"unknown key {key!r}.{suggest(key, allowed)}",
                       f"allowed keys here: {', '.join(allowed)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_setting(key: str, value, where: str):
    """Validate (and normalise) one setting; returns the value to use."""
    bad = _err(where, f"{key} = {value!r} is invalid", f"{key}: {SETTINGS[key]}")
    if key in ("epochs", "batch_size"):
        if not _is_int(value) or value < 1:
            raise bad
    elif key == "image_size":
        if value is not None and (not _is_int(value) or value < 8):
            raise bad
    elif key == "warmup_epochs":
        if value is not None and (not _is_int(value) or value < 0):
            raise bad
    elif key == "data_seed":
        if not _is_int(value) or value < 0:
            raise bad
    elif key == "optimizer":
        if value is not None and value not in ("sgd", "adamw"):
            raise bad
    elif key == "normalization":
        if value not in ("pretrained_cfg", "paper"):
            raise bad
    elif key == "augment":
        if not isinstance(value, bool):
            raise bad
    elif key in ("lr_grid", "wd_grid"):
        if not isinstance(value, list) or not value or not all(_is_num(v) for v in value):
            raise bad
        if key == "lr_grid" and any(v <= 0 for v in value) or key == "wd_grid" and any(v < 0 for v in value):
            raise bad
        value = sorted({float(v) for v in value})
    elif key == "seeds":
        if not isinstance(value, list) or not value or not all(_is_int(v) and v >= 0 for v in value):
            raise bad
        value = list(dict.fromkeys(int(v) for v in value))
    elif key in ("train_size", "val_size", "test_size"):
        if value == "all":
            value = None
        elif value is not None and (not _is_int(value) or value < 1):
            raise bad
    return value


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def parse_suite(raw: dict, where: str = "<suite>") -> Suite:
    _check_keys(raw, TOP_KEYS, where)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(where, f"name = {name!r} is missing or invalid",
                   'give the suite a name of letters, digits and -_. e.g. name = "my-suite"')
    defaults = copy.deepcopy(DEFAULTS)
    table = raw.get("defaults", {})
    if not isinstance(table, dict):
        raise _err(where, "[defaults] must be a table", "write [defaults] followed by key = value lines")
    _check_keys(table, tuple(SETTINGS), f"{where} [defaults]")
    for key, value in table.items():
        defaults[key] = check_setting(key, value, f"{where} [defaults]")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise _err(where, "the suite has no [[tasks]]",
                   'add at least one task: [[tasks]] name = "…" group = "Natural" data = "…"')
    tasks, seen = [], set()
    for i, t in enumerate(tasks_raw, 1):
        w = f"{where} [[tasks]] #{i}"
        if not isinstance(t, dict):
            raise _err(w, "a task must be a table", 'write [[tasks]] then name = "…", group = "…", data = "…"')
        _check_keys(t, TASK_KEYS + tuple(SETTINGS), w)
        for key in TASK_KEYS:
            if not isinstance(t.get(key), str) or not t.get(key).strip():
                raise _err(w, f"{key} is missing or not a string",
                           'each task needs name = "…", group = "…" (e.g. Natural) and data = "…" (a data spec)')
        tname = t["name"].strip()
        if not _NAME.match(tname):
            raise _err(w, f"task name {tname!r} has characters other than letters, digits and -_.+",
                       "rename it (it becomes a folder name)")
        if tname in seen:
            raise _err(w, f"task {tname!r} appears twice", "give every task a distinct name")
        seen.add(tname)
        overrides = {k: check_setting(k, v, w) for k, v in t.items() if k in SETTINGS}
        tasks.append(Task(tname, t["group"].strip(), t["data"].strip(), overrides))
    methods_raw = raw.get("methods", {})
    if not isinstance(methods_raw, dict):
        raise _err(where, "[methods] must be a table of tables", "write e.g. [methods.full] optimizer = \"adamw\"")
    methods = {}
    for mname, mt in methods_raw.items():
        w = f"{where} [methods.{mname}]"
        if not isinstance(mt, dict):
            raise _err(w, "must be a table", f"write [methods.{mname}] then key = value lines")
        methods[mname] = {}
        for k, v in mt.items():
            if k in SETTINGS and k not in METHOD_SETTINGS:
                raise _err(w, f"{k} is a per-task setting; a method cannot change it",
                           f"per-method settings: {', '.join(METHOD_SETTINGS)}; other keys are method options")
            methods[mname][k] = check_setting(k, v, w) if k in METHOD_SETTINGS else v
    distill = _parse_distill(raw.get("distill", {}), f"{where} [distill]")
    root = raw.get("root")
    if root is not None and not isinstance(root, str):
        raise _err(where, "root must be a string (a folder)", 'e.g. root = "/data/vtab-1k"')
    return Suite(name=name, description=str(raw.get("description", "")).strip(), defaults=defaults, tasks=tasks,
                 methods=methods, root=root or None, root_help=raw.get("root_help"), path=where, distill=distill)


TEACHER_HELP = ('teacher = "<folder>/{task}": the --out folder of a vistune run per task ({task}: the task\'s name, '
                '{root}: the data root)')


def _parse_distill(table, where: str) -> dict:
    """The ``[distill]`` table: ``teacher`` (a path template) and distillation options, checked now."""
    if not isinstance(table, dict):
        raise _err(where, "must be a table", f"write [distill] then {TEACHER_HELP}")
    allowed = ("teacher", *DistillConfig.fields_help())
    _check_keys(table, allowed, where)
    teacher = table.get("teacher")
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        raise _err(where, f"teacher = {teacher!r} is not a path", TEACHER_HELP)
    options = {k: v for k, v in table.items() if k != "teacher"}
    try:
        procedure_config("distill", options)
    except VistuneError as e:
        raise _err(where, e.what, e.fix or "see `vistune methods --details`") from None
    return dict(table)
