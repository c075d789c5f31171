"""The benchmark harness: suites (TOML), the resumable VPT-protocol sweep, the SQLite store, the report.

    from vistune.bench import BenchOptions, run_bench, write_report
    run_bench(BenchOptions("offline-mini", ["linear", "bias"], "tf_efficientnet_lite0", "bench-out", epochs=5))
    write_report("bench-out")

Modules, each importing only those before it: ``suite``, ``store`` → ``plan`` (typed, pure) → ``progress``,
``data_cache`` → ``records`` → ``jobs`` → ``local_executor``, ``ray_executor`` → ``sweep`` (orchestrates,
with ``efficiency``) → ``report`` (reads the store and the plan) → ``cli``.
"""
from .plan import Cell, Plan, SelectRun
from .ray_executor import RayOptions
from .report import collect, write_report
from .store import STORE, Store
from .suite import Suite, Task, builtin_suites, load_suite, parse_suite
from .sweep import BenchOptions, run_bench

__all__ = ["run_bench", "BenchOptions", "RayOptions", "write_report", "collect", "Plan", "Cell", "SelectRun",
           "load_suite", "parse_suite", "builtin_suites", "Suite", "Task", "Store", "STORE"]
