"""What the per-configuration benchmark scripts share (run as `python benchmarks/<script>.py`).

Each script measures one configuration per child process (so that peak memory is that
configuration's own) and prints a table of the rows the children return.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    return timeit_interleaved({"fn": fn}, device, steps, warmup)["fn"]


def timeit_interleaved(fns: dict, device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of several functions measured in turns, so that load from other processes on a
    shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 on CPU (where bf16 is slower), as the trainer does."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def peak_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sgd_step(model, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """One training step of ``model`` (forward, cross-entropy, backward, SGD momentum step), as a closure."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        model.train()
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


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
