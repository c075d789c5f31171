"""The results store: one SQLite row per finished run (``DIR/results.sqlite``).

A run is identified by its *run key*: a canonical JSON of everything that decides its result
(suite, task, method and its options, phase, lr, weight decay, seed, backbone, epochs, image size,
batch size, data sizes, …). A key already in the table is never run again, which makes a bench
resumable: kill it, re-run the same command, and only the missing runs are trained. Each row is
committed as soon as its run finishes. The ``efficiency`` table holds one measurement of training speed,
peak memory and inference latency per method (``vistune.bench.efficiency``), keyed the same way.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from ..errors import VistuneError

STORE = "results.sqlite"
SCHEMA_VERSION = 1

COLUMNS = [
    ("run_key", "TEXT NOT NULL UNIQUE"),
    ("suite", "TEXT NOT NULL"),
    ("task", "TEXT NOT NULL"),
    ("task_group", "TEXT"),
    ("method", "TEXT NOT NULL"),
    ("phase", "TEXT NOT NULL CHECK (phase IN ('select', 'final'))"),
    ("lr", "REAL"),
    ("weight_decay", "REAL"),
    ("seed", "INTEGER"),
    ("backbone", "TEXT"),
    ("epochs", "INTEGER"),
    ("image_size", "INTEGER"),
    ("status", "TEXT NOT NULL"),  # ok | diverged
    ("error", "TEXT"),
    ("val_accuracy", "REAL"),
    ("test_accuracy", "REAL"),  # always NULL for phase='select': selection never evaluates test
    ("tuned_params", "INTEGER"),
    ("tuned_params_excluding_head", "INTEGER"),
    ("backbone_params", "INTEGER"),
    ("artifact_bytes", "INTEGER"),
    ("artifact_dir", "TEXT"),  # relative to the bench folder (final runs only)
    ("train_seconds", "REAL"),
    ("wall_seconds", "REAL"),
    ("peak_memory_mb", "REAL"),
    ("config", "TEXT"),  # JSON: the full job (training config, method config, data, preprocessing)
    ("versions", "TEXT"),  # JSON: vistune, torch, timm, python
    ("git_commit", "TEXT"),
    ("device", "TEXT"),
    ("started_at", "TEXT"),
    ("finished_at", "TEXT"),
]
COLUMN_NAMES = [c for c, _ in COLUMNS]


def canonical(obj) -> str:
    """The canonical JSON text of a run key (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60)
            self.db.row_factory = sqlite3.Row
            self._init()
        except sqlite3.DatabaseError as e:
            raise VistuneError(f"{self.path} is not a vistune results store ({e})",
                               "point --out / report at a bench folder, or move that file away") from None

    def _init(self) -> None:
        cols = ",\n  ".join(f"{name} {decl}" for name, decl in COLUMNS)
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise VistuneError(f"{self.path} has results schema {row[0]}, this vistune reads {SCHEMA_VERSION}",
                                   "use the vistune version that wrote it, or a new --out folder")
            self.db.execute(f"CREATE TABLE IF NOT EXISTS runs (\n  id INTEGER PRIMARY KEY,\n  {cols}\n)")
            self.db.execute("CREATE INDEX IF NOT EXISTS runs_cell ON runs (suite, task, method, phase)")
            self.db.execute("CREATE TABLE IF NOT EXISTS benches (id INTEGER PRIMARY KEY, started_at TEXT, "
                            "command TEXT, plan TEXT)")
            # added after schema 1 shipped; CREATE … IF NOT EXISTS gives older stores the table on open
            self.db.execute("CREATE TABLE IF NOT EXISTS efficiency (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, "
                            "method TEXT NOT NULL, backbone TEXT, result TEXT NOT NULL, measured_at TEXT)")

    # ---- runs -----------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE run_key = ?", (key,)).fetchone() is not None

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT * FROM runs WHERE run_key = ?", (key,)).fetchone()
        return dict(row) if row is not None else None

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        out = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = f"SELECT * FROM runs WHERE run_key IN ({','.join('?' * len(chunk))})"
            out.update({r["run_key"]: dict(r) for r in self.db.execute(q, chunk)})
        return out

    def insert(self, row: dict) -> None:
        """Add one finished run and commit at once (a crash after this loses nothing)."""
        unknown = set(row) - set(COLUMN_NAMES)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        names = [c for c in COLUMN_NAMES if c in row]
        with self.db:
            self.db.execute(f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                            [row[c] for c in names])

    def move_artifact(self, old_dir: str, new_dir: str) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET artifact_dir = ? WHERE artifact_dir = ?", (new_dir, old_dir))

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def rows(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id")]

    # ---- efficiency measurements (one per method × backbone × protocol settings × device) -------------
    def efficiency(self, key: str) -> dict | None:
        row = self.db.execute("SELECT result FROM efficiency WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def insert_efficiency(self, key: str, method: str, backbone: str, result: dict, measured_at: str) -> None:
        with self.db:
            self.db.execute("INSERT INTO efficiency (key, method, backbone, result, measured_at) VALUES (?, ?, ?, ?, ?)",
                            (key, method, backbone, json.dumps(result), measured_at))

    # ---- bench invocations (the plan the report is built from) -----------------------------------
    def add_bench(self, started_at: str, command: str, plan: dict) -> None:
        with self.db:
            self.db.execute("INSERT INTO benches (started_at, command, plan) VALUES (?, ?, ?)",
                            (started_at, command, json.dumps(plan)))

    def benches(self) -> list[dict]:
        """Recorded bench invocations, newest first."""
        return [{"started_at": r["started_at"], "command": r["command"], "plan": json.loads(r["plan"])}
                for r in self.db.execute("SELECT * FROM benches ORDER BY id DESC")]

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
