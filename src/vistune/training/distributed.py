"""Data-parallel training across processes: torch.distributed + DistributedDataParallel, started by torchrun.

``torchrun --nproc_per_node N -m vistune train …`` starts N processes and gives each RANK, LOCAL_RANK,
WORLD_SIZE and a rendezvous address in its environment; :func:`process_group` joins them (gloo on CPU,
nccl on CUDA). The trainer then asks :func:`world_size` / :func:`rank`: each process takes 1/N of every
global batch, DDP averages the gradients, evaluation is split across the processes and summed, and
only rank 0 writes files. With one process every helper here is a no-op.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from ..errors import VistuneError


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started with more than one process in total."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """The process that writes checkpoints, artifacts and metrics and shows progress."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Under DDP on CUDA, a bare ``cuda`` means this process's own GPU (LOCAL_RANK), not GPU 0."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count())))
    return device


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """Join torchrun's process group for the duration of the block; nothing happens for one process."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise VistuneError("torchrun started several processes, but this PyTorch build has no torch.distributed",
                           "install a PyTorch build with distributed support, or run without torchrun")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def sum_across(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all processes (float64, so counts stay exact)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average_across(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each floating tensor, in place, by its mean over all processes."""
    if not active():
        return
    for t in tensors:
        if t.is_floating_point():
            dist.all_reduce(t)
            t.div_(world_size())
