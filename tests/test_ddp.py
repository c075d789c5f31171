"""Data-parallel training (torch DDP, gloo, 2 CPU processes) computes what one process computes.

Why the two agree: one global permutation per epoch (DistributedSampler seeded by (seed, epoch)); one
process takes batches of B consecutive items of it, each of the 2 processes takes every other item in
batches of B/2, so its batch k and the other's together are exactly the single process's batch k, and DDP
averages the two halves' gradients into the single process's mean gradient. The methods compared have no
dropout and no train-mode BatchNorm (those differ by design, see docs/benchmarks.md); for the MLP-2 head
(BatchNorm) the check is that the processes agree with each other.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import IMAGE_SIZE, TINY, tiny_backbone, tinted_class_folder
from vistune.artifacts import TENSORS
from vistune.run import METRICS, Job, read_metrics, run_job
from vistune.training import TrainConfig

WORLD = 2
# (name, method, options): head-only on the feature cache; the adapter trains inside the backbone
# (DDP around the whole model) and is interrupted after 2 of 4 epochs, then resumed
JOBS = [("linear", "linear", {}), ("adapter", "adapter", {"reduction": 4}),
        ("mlp", "mlp", {"k": 2, "dropout": 0.0})]
INTERRUPT_AT_EPOCH = 2  # 0-based: epochs 1-2 are done and checkpointed


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes × 8 train (19 train / 5 val after the split: uneven over 2 processes) and 4 test images."""
    return tinted_class_folder(tmp_path_factory.mktemp("ddp-data"), 8, 4, seed=1)


def make_job(method: str, options: dict, data: Path, out: Path) -> Job:
    arch, kwargs = TINY["vit"]
    return Job(backbone=arch, method=method, data=str(data), out=str(out), overrides=dict(options), random_init=True,
               model_kwargs=kwargs, image_size=IMAGE_SIZE,
               train=TrainConfig(epochs=4, batch_size=4, lr=0.5, device="cpu", seed=3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refuse_writes(*_args, **_kwargs):
    raise AssertionError(f"rank {dist.get_rank()} wrote a file; only rank 0 may")


def _worker(rank: int, port: int, data: Path, out: Path) -> None:
    """One of the 2 processes: the JOBS under DDP; what this rank computed goes to out/rank<r>.json."""
    import vistune._io
    import vistune.artifacts
    import vistune.training.trainer as trainer_mod

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90))
    try:
        if rank != 0:
            vistune._io.atomic_write_group = vistune.artifacts.atomic_write_group = _refuse_writes
        backbone = tiny_backbone("vit")
        seen = {}
        for name, method, options in JOBS:
            job = make_job(method, options, data, out / name)
            if name == "adapter":
                real_lr_factor = trainer_mod._lr_factor

                def interrupt(epoch, cfg):
                    if epoch == INTERRUPT_AT_EPOCH:
                        raise KeyboardInterrupt
                    return real_lr_factor(epoch, cfg)

                trainer_mod._lr_factor = interrupt
                try:
                    run_job(job, backbone=backbone, progress=False)
                    raise AssertionError("the interruption did not happen")
                except KeyboardInterrupt:
                    pass
                finally:
                    trainer_mod._lr_factor = real_lr_factor
                dist.barrier()  # rank 0's checkpoint is on disk before anyone resumes
                metrics = run_job(job, backbone=backbone, progress=False, resume=True)
            else:
                metrics = run_job(job, backbone=backbone, progress=False)
            state = metrics["model"].tuned_state_dict()
            seen[name] = {"val_accuracy": metrics["val_accuracy"], "best_epoch": metrics["best_epoch"],
                          "test_accuracy": metrics["test_accuracy"], "processes": metrics["processes"],
                          "history": [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]],
                          "state": {k: v.tolist() for k, v in state.items()}}
        with open(out / f"rank{rank}.json", "w") as f:  # the test's own report, not a vistune write
            json.dump(seen, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-runs")
    mp.spawn(_worker, args=(_free_port(), folder, out), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def single_runs(folder, tmp_path_factory, one_thread) -> dict:
    out = tmp_path_factory.mktemp("single-runs")
    backbone = tiny_backbone("vit")
    return {name: run_job(make_job(method, options, folder, out / name), backbone=backbone, progress=False)
            for name, method, options in JOBS}


def _close(a, b) -> bool:
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "adapter"])
def test_two_processes_train_what_one_process_trains(name, ddp_run, single_runs):
    single = single_runs[name]
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text())[name] for r in range(WORLD)]
    for got in ranks:  # every rank selected the same epoch from the same (all-reduced) val accuracy
        assert got["processes"] == WORLD
        assert got["val_accuracy"] == single["val_accuracy"] and got["best_epoch"] == single["best_epoch"]
        assert got["test_accuracy"] == single["test_accuracy"]
        assert len(got["history"]) == len(single["history"]) == 4
        for h_ddp, h_one in zip(got["history"], single["history"]):
            assert h_ddp["val_accuracy"] == h_one["val_accuracy"] and h_ddp["lr"] == h_one["lr"]
            assert _close(h_ddp["train_loss"], h_one["train_loss"]) and _close(h_ddp["val_loss"], h_one["val_loss"])
        state = single["model"].tuned_state_dict()
        assert got["state"].keys() == state.keys()
        assert all(_close(got["state"][k], state[k]) for k in state)
    # the run really trained (the comparison is not between two untouched initialisations)
    losses = [h["train_loss"] for h in single["history"]]
    assert losses[-1] < losses[0]
    # rank 0 wrote the artifact and metrics (rank 1 was made unable to write) and they hold the DDP result
    saved = load_file(str(ddp_run / name / TENSORS))
    assert all(_close(saved[k], ranks[0]["state"][k]) for k in saved)
    assert read_metrics(ddp_run / name)["processes"] == WORLD


def test_train_mode_batchnorm_statistics_agree_across_processes(ddp_run):
    """MLP-2's BatchNorm normalises each process's 2 images (not one process's 4), so its run is not the
    single-process one; each process updates the running statistics from its own images, and they are
    averaged after each epoch so that every process evaluates (and rank 0 saves) the same model."""
    rank0, rank1 = (json.loads((ddp_run / f"rank{r}.json").read_text())["mlp"] for r in range(WORLD))
    assert any(k.endswith("running_var") for k in rank0["state"])
    assert rank0["state"] == rank1["state"] and rank0["history"] == rank1["history"]


def test_torchrun_cli_run_matches_the_single_process_cli(folder, tmp_path):
    """The documented invocation: torchrun --nproc_per_node 2 -m vistune train … (gloo on CPU)."""
    args = ["train", "--backbone", "vistune/vit-tiny-cifar10", "--method", "linear", "--data", str(folder),
            "--epochs", "3", "--batch-size", "4", "--lr", "0.5", "--device", "cpu", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    ddp = subprocess.run([*torchrun, "-m", "vistune", *args, "--out", str(tmp_path / "ddp")], env=env,
                         capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("val accuracy") == 1, "rank 0 alone prints the result"
    from vistune.cli import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    a, b = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert (a["processes"], b["processes"]) == (WORLD, 1)
    assert a["val_accuracy"] == b["val_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
    assert _close([h["train_loss"] for h in a["history"]], [h["train_loss"] for h in b["history"]])
    ta, tb = load_file(str(tmp_path / "ddp" / TENSORS)), load_file(str(tmp_path / "one" / TENSORS))
    assert all(_close(ta[k], tb[k]) for k in tb)
    assert (tmp_path / "ddp" / METRICS).is_file()


def test_torchrun_only_runs_train(monkeypatch, capsys):
    from vistune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["methods"]) == 2
    assert "torchrun" in capsys.readouterr().err
