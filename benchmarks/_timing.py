"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
