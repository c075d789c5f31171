"""Resume, output folders and saves: `--resume` refuses a changed job and says what changed, an `--out` holding
something a user made is never overwritten, a full disk or a damaged checkpoint is a clear error, stale temp files
of a killed save are removed (only those), files honour the umask, and a finished run keeps no checkpoint
(tiny random backbones and image folders: fast)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vistune.training.trainer as trainer_mod
from conftest import IMAGE_SIZE, TINY, tinted_class_folder
from vistune import demo
from vistune._io import atomic_dir, atomic_write_json, remove_stale_temps
from vistune.artifacts import META, TENSORS, load_artifact
from vistune.errors import VistuneError
from vistune.run import METRICS, Job, read_metrics, run_job
from vistune.training import TrainConfig
from vistune.training.trainer import STATE_FILE


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tinted_class_folder(tmp_path_factory.mktemp("data") / "d", n_train=8, n_test=2, seed=0)


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory) -> Path:
    """Other images of the same three classes."""
    return tinted_class_folder(tmp_path_factory.mktemp("data") / "d2", n_train=8, n_test=2, seed=1)


def job(data: Path, out: Path | None, method: str = "adapter", overrides=None, image_size: int = IMAGE_SIZE,
        kind: str = "resnet", keep_state: bool = False, **train) -> Job:
    arch, kwargs = TINY[kind]
    cfg = dict(epochs=2, batch_size=4, lr=0.5, device="cpu", seed=3)
    cfg.update(train)
    return Job(backbone=arch, method=method, data=str(data), out=None if out is None else str(out),
               overrides={"reduction": 4} if overrides is None and method == "adapter" else (overrides or {}),
               random_init=True, model_kwargs=kwargs, image_size=image_size, train=TrainConfig(**cfg),
               keep_state=keep_state)


def interrupt_in_epoch_2(j: Job) -> None:
    """Run ``j`` and stop it at the first step of epoch 2: epoch 1's checkpoint is on disk, no artifact."""
    def stop(done, total):
        if done == total // j.train.epochs + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(j, progress=False, on_step=stop)
    assert (Path(j.out) / STATE_FILE).is_file() and not (Path(j.out) / METRICS).exists()


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def interrupted(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "interrupted"
    interrupt_in_epoch_2(job(folder, out))
    return out


# ------------------------------------------------------------------------------------- resume identity
@pytest.mark.parametrize("change,expect", [
    (dict(data="other"), "  --data: '"),
    (dict(overrides={"reduction": 2}), "  --set reduction: 4 → 2"),
    (dict(method="bias", overrides={}), "  --method: 'adapter' → 'bias'"),
    (dict(image_size=64), "  --image-size: 32 → 64"),
    (dict(lr=0.1), "  --lr: 0.5 → 0.1"),
    (dict(epochs=3), "  --epochs: 2 → 3"),
], ids=["data", "method-option", "method", "image-size", "lr", "epochs"])
def test_resume_refuses_a_changed_job_and_says_what_changed(change, expect, interrupted, folder, other_folder):
    before = files(interrupted)
    change = dict(change)
    data = other_folder if change.pop("data", None) else folder
    with pytest.raises(VistuneError) as e:
        run_job(job(data, interrupted, **change), resume=True, progress=False)
    assert f"--resume: {interrupted / STATE_FILE} was written by a different job" in e.value.what
    assert expect in e.value.what, e.value.what
    if data is other_folder:
        assert f"'{folder}' → '{other_folder}'" in e.value.what
    assert "interrupted run's settings" in e.value.fix and "new --out folder" in e.value.fix
    assert files(interrupted) == before, "a refused resume changes nothing"


def test_resume_of_the_same_job_continues_it(interrupted, folder, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for name, data in files(interrupted).items():
        (out / name).write_bytes(data)
    m = run_job(job(folder, out), resume=True, progress=False)
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert (out / METRICS).is_file() and (out / TENSORS).is_file()


def test_a_finished_run_keeps_no_checkpoint_unless_asked(folder, tmp_path):
    run_job(job(folder, tmp_path / "plain", epochs=1), progress=False)
    assert not (tmp_path / "plain" / STATE_FILE).exists()
    assert {p.name for p in (tmp_path / "plain").iterdir()} == {META, TENSORS, METRICS}
    run_job(job(folder, tmp_path / "kept", epochs=1, keep_state=True), progress=False)
    assert torch.load(tmp_path / "kept" / STATE_FILE, weights_only=True)["epoch"] == 0
    with pytest.raises(VistuneError, match="finished run") as e:  # nothing to resume, and never overwritten
        run_job(job(folder, tmp_path / "kept", epochs=1, keep_state=True), resume=True, progress=False)
    assert "nothing to resume" in e.value.what and "vistune eval --adapter" in e.value.fix


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-a-checkpoint"])
def test_a_corrupt_checkpoint_is_a_clear_error(damage, interrupted, folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    state = (interrupted / STATE_FILE).read_bytes()
    if damage == "garbage":
        (out / STATE_FILE).write_bytes(b"\x80\x04 these are not the bytes of a checkpoint" * 10)
    elif damage == "truncated":
        (out / STATE_FILE).write_bytes(state[: len(state) // 2])
    else:
        torch.save({"epoch": 0}, out / STATE_FILE)
    with pytest.raises(VistuneError) as e:
        run_job(job(folder, out), resume=True, progress=False)
    assert e.value.what.startswith(f"checkpoint {out / STATE_FILE} is corrupt")
    assert e.value.fix.startswith("delete it or use a new --out")
    assert "weights_only" not in str(e.value)


def test_a_full_disk_during_training_is_a_clear_error_and_keeps_the_last_checkpoint(folder, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def save_once_then_full(obj, path, *args, **kwargs):  # epoch 1's checkpoint is written, epoch 2's is not
        saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.torch, "save", save_once_then_full)
    with pytest.raises(VistuneError) as e:
        run_job(job(folder, out), progress=False)
    monkeypatch.undo()
    assert e.value.what.startswith(f"no space left on the disk of {out} while writing {STATE_FILE}")
    assert "--resume" in e.value.fix
    assert sorted(p.name for p in out.iterdir()) == [STATE_FILE], "no temp file left"
    assert torch.load(out / STATE_FILE, weights_only=True)["epoch"] == 0
    m = run_job(job(folder, out), resume=True, progress=False)  # space freed: it continues
    assert len(m["history"]) == 2


# ------------------------------------------------------------------------------------------ --out
def test_an_artifact_a_user_made_is_never_overwritten(folder, tmp_path):
    out = tmp_path / "mine"
    run_job(job(folder, out, epochs=1), progress=False)
    (out / METRICS).unlink()  # adapter.json + adapter.safetensors alone: a user's artifact
    before = files(out)
    for resume in (False, True):
        with pytest.raises(VistuneError) as e:
            run_job(job(folder, out, epochs=1), resume=resume, progress=False)
        assert f"{out} holds an artifact (adapter.json, adapter.safetensors)" in e.value.what
        assert "another --out" in e.value.fix
    assert files(out) == before


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("mine")
    bad = Job(backbone="no-such-backbone", method="linear", data=str(tmp_path / "no-data"), out=str(out))
    for where, expect in ((out, "is a file"), (out / "sub", f"lies inside {out}, which is a file")):
        with pytest.raises(VistuneError) as e:  # before the backbone or the data is looked at
            run_job(Job(**{**bad.__dict__, "out": str(where)}), progress=False)
        assert f"--out {where} {expect}, not a folder" in e.value.what
    assert out.read_text() == "mine"


# ------------------------------------------------------------------------------------- stale temp files
def _age(path: Path, seconds: float = 3600) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)


def test_only_stale_temp_files_of_vistunes_own_naming_are_removed(tmp_path):
    stale = [tmp_path / ".adapter.json.ab12cd_9.tmp", tmp_path / ".train_state.pt.zzzzzzzz.tmp"]
    for p in stale:
        p.write_bytes(b"half a save")
    stale_dir = tmp_path / ".export.partial-a1b2c3d4"
    (stale_dir / "inner").mkdir(parents=True)
    moved_aside = tmp_path / "..export.partial-q1w2e3r4.old"
    moved_aside.mkdir()
    kept = [tmp_path / name for name in (".adapter.json.tmp", "notes.tmp", ".x.abc.tmp", "adapter.json.ab12cd34.tmp",
                                         ".x.ABCDEFGH.tmp", ".x.partial-short", "my.partial-a1b2c3d4")]
    for p in kept:
        p.write_bytes(b"a user's file")
    fresh = tmp_path / ".metrics.json.fresh123.tmp"  # newer than this process: may be a writer at work
    locked = tmp_path / ".report.md.locked12.tmp"  # old, but a live writer holds its lock
    link = tmp_path / ".link.abcdefgh.tmp"
    target = tmp_path / "target"
    target.write_text("keep me")
    link.symlink_to(target)
    locked.write_bytes(b"being written")
    for p in [*stale, stale_dir, moved_aside, *kept, locked, link]:
        _age(p)
    fresh.write_bytes(b"being written")
    with open(locked, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([*stale, stale_dir, moved_aside])
    assert all(not p.exists() for p in removed)
    assert all(p.exists() for p in [*kept, fresh, locked, link, target]) and target.read_text() == "keep me"
    assert remove_stale_temps(tmp_path, name="report.md") == [locked]  # its writer is gone now


def test_a_save_killed_by_sigkill_leaves_temp_files_that_the_next_run_removes(folder, tmp_path):
    """A real writer process is killed mid-save: its temp file stays while it lives (locked), and is removed
    by the next run of that folder."""
    out = tmp_path / "run"
    out.mkdir()
    script = ("import sys, time; from vistune._io import atomic_write\n"
              "def write(tmp):\n    open(tmp, 'wb').write(b'x' * 1000); print(tmp, flush=True); time.sleep(600)\n"
              f"atomic_write({str(out / TENSORS)!r}, write)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        temp = Path(writer.stdout.readline().strip())
        assert temp.parent == out and temp.name.startswith(f".{TENSORS}.") and temp.name.endswith(".tmp")
        _age(temp)  # as if written long ago: only its lock tells that its writer is alive
        assert remove_stale_temps(out) == [] and temp.exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert temp.exists()  # what SIGKILL leaves behind
    lines = []
    run_job(job(folder, out, epochs=1), progress=False, notify=lines.append)
    assert not temp.exists()
    assert any("removed 1 temporary file(s)" in line for line in lines)
    assert {p.name for p in out.iterdir()} == {META, TENSORS, METRICS}


# ------------------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(umask, mode, folder, tmp_path):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        run_job(job(folder, out, epochs=1), progress=False)
        with atomic_dir(tmp_path / "exported") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(old)
    for name in (META, TENSORS, METRICS):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((tmp_path / "exported").stat().st_mode) == mode | (0o111 & ~umask)


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"a": 1})
    path.chmod(0o640)
    atomic_write_json(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"a": 2}


# ------------------------------------------------------------------------- demo and bench reuse runs
def test_demo_reuses_a_finished_run_and_resumes_an_interrupted_one(folder, tmp_path, monkeypatch):
    finished, interrupted_out = tmp_path / "finished", tmp_path / "interrupted"
    run_job(job(folder, finished, epochs=1), progress=False)
    interrupt_in_epoch_2(job(folder, interrupted_out))
    calls = []
    monkeypatch.setattr(demo, "run_job", lambda j, **kw: calls.append(kw["resume"]) or run_job(j, **kw))
    reused = demo._run_or_reuse(job(folder, finished, epochs=1), False, None, None)
    assert reused.pop("reused") is True and reused == read_metrics(finished)
    assert calls == []  # read back, not trained
    m = demo._run_or_reuse(job(folder, interrupted_out), False, None, None)
    assert calls == [True] and [h["epoch"] for h in m["history"]] == [1, 2]
    assert not (interrupted_out / STATE_FILE).exists()
    load_artifact(interrupted_out)


def test_demo_jobs_record_the_demo_splits():
    """The demo trains on data it loaded itself; its jobs still carry the sizes, so each artifact records them and
    `vistune eval` (which the demo suggests at its end) redraws the demo's own 2,000 test images, not all 10,000."""
    from vistune.run import split_settings

    for quick in (False, True):
        _, sizes = demo.demo_data(quick)
        for method, sets, epochs, lr in demo.DEMO_METHODS:
            job = demo.demo_job(method, sets, epochs, lr, out="o", quick=quick, device="cpu")
            assert {k: split_settings(job)[k] for k in sizes} == sizes and job.data_seed == 0
