"""The benchmark harness: suites (TOML), the resumable VPT-protocol sweep, the SQLite store, the report.

    from vistune.bench import run_bench, write_report
    run_bench("offline-mini", ["linear", "bias"], "tf_efficientnet_lite0", "bench-out", epochs=5)
    write_report("bench-out")
"""
from .report import collect, write_report
from .store import STORE, Store
from .suite import Suite, Task, builtin_suites, load_suite, parse_suite
from .sweep import run_bench

__all__ = ["run_bench", "write_report", "collect", "load_suite", "parse_suite", "builtin_suites", "Suite", "Task",
           "Store", "STORE"]
