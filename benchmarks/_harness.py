"""What the per-configuration benchmark scripts share (run as `python benchmarks/<script>.py`).

Each script measures one configuration per child process (so that peak memory is that
configuration's own) and prints a table of the rows the children return.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# the timing, precision, memory and training-step pieces are those of `vistune bench`'s efficiency protocol
from vistune.bench.efficiency import autocast, sgd_step, timeit, timeit_interleaved
from vistune.bench.efficiency import peak_memory_mb as peak_mb

__all__ = ["autocast", "peak_mb", "sgd_step", "timeit", "timeit_interleaved", "split_methods", "method_config",
           "run_configs"]


def split_methods(text: str) -> list[str]:
    """'a,b:k=1,k2=2,c' → ['a', 'b:k=1,k2=2', 'c'] (a key=value continues the previous method)."""
    out: list[str] = []
    for part in text.split(","):
        if "=" in part and ":" not in part and out:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def method_config(spec: str):
    """'name:k=v,k2=v2' → (name, {k: v, k2: v2})."""
    name, _, opts = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in opts.split(",") if kv)


def run_configs(script: str, configs: list[str]) -> list[dict]:
    """Run ``script --config C <this process's arguments>`` for each C in its own process; their rows."""
    args = [a for a in sys.argv[1:] if not a.startswith("--config")]
    rows = []
    for config in configs:
        out = subprocess.run([sys.executable, script, "--config", config, *args], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {config}", file=sys.stderr)
    return rows
