"""Artifacts (adapter.safetensors + adapter.json): round trip, and every way a load must refuse.

Loading must never unpickle anything, must refuse a backbone with other weights, a tensor file
that does not fit the method or the json, and an interrupted save must leave the previous
artifact intact and loadable.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vistune.artifacts as artifacts_mod
from vistune._io import sha256_file
from conftest import IMAGE_SIZE, tiny_backbone
from vistune.artifacts import META, TENSORS, load_artifact, read_meta, save_artifact
from vistune.errors import VistuneError
from vistune.methods import adapt, make_config

CLASSES = ["a", "b", "c"]
PREP = {"image_size": IMAGE_SIZE}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _model(backbone, method="adapter", seed=0, overrides=None):
    torch.manual_seed(seed)
    model = adapt(backbone, make_config(method, overrides or ({"reduction": 4} if method == "adapter" else {})), 3)
    with torch.no_grad():  # make every tuned tensor non-trivial (adapter "up" starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _write_meta(out: Path, meta: dict) -> None:
    """Write an edited adapter.json with its own checksum updated, as a careful editor would."""
    meta[artifacts_mod.META_CHECKSUM] = artifacts_mod.meta_checksum(meta)
    (out / META).write_text(json.dumps(meta))


def _rewrite_tensors(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the tensor file and update the json's checksums, as a careful editor would."""
    save_file(tensors, str(out / TENSORS), metadata={"format": artifacts_mod.FORMAT})
    meta = json.loads((out / META).read_text())
    meta["tensors_sha256"] = sha256_file(out / TENSORS)
    _write_meta(out, meta)


def _refusal(out, backbone) -> VistuneError:
    with pytest.raises(VistuneError) as e:
        load_artifact(out, backbone=backbone)
    assert e.value.what and e.value.fix, "every refusal says what is wrong and how to fix it"
    return e.value


@pytest.fixture()
def saved(tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    model = _model(backbone)
    out = tmp_path / "art"
    size = save_artifact(model, out, class_names=CLASSES, preprocessing=PREP)
    return backbone, model, out, size


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_is_exact_and_records_what_it_needs(saved):
    backbone, model, out, size = saved
    assert sorted(p.name for p in out.iterdir()) == [META, TENSORS]  # no temp files left behind
    assert size == (out / TENSORS).stat().st_size + (out / META).stat().st_size
    meta = read_meta(out)
    assert meta["method"] == "adapter" and meta["config"]["reduction"] == 4
    assert meta["class_names"] == CLASSES and meta["num_classes"] == 3 and meta["preprocessing"] == PREP
    assert meta["backbone"]["fingerprint"] == backbone.fingerprint()
    assert meta["backbone"]["source"] == "random-init"
    # only tuned tensors are stored: no frozen backbone weight
    stored = load_file(str(out / TENSORS))
    assert set(stored) == set(model.tuned_state_dict())
    assert sum(v.numel() for v in stored.values()) < sum(p.numel() for p in backbone.parameters())

    reloaded, _ = load_artifact(out, backbone=backbone)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    # without a backbone, the one the artifact names is rebuilt (same random init) and fits
    rebuilt, _ = load_artifact(out)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


# ------------------------------------------------------------------------------------------ refusals
def test_refuses_a_backbone_with_other_weights(saved):
    _, _, out, _ = saved
    other = tiny_backbone("vit")  # same architecture and random init …
    with torch.no_grad():
        other.model.blocks[0].mlp.fc1.weight.add_(1e-3)  # … but one weight differs
    err = _refusal(out, other)
    assert "weights" in err.what and "trained on backbone" in err.what
    assert "backbone it was trained on" in err.fix


class _Bomb:
    """Unpickling this creates a file and prints: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        code = f"open({self.marker!r}, 'w').write('unpickled'); print('UNPICKLED')"
        return (exec, (code,))


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_refuses_a_pickle_without_unpickling_it(saved, tmp_path, capfd, kind):
    backbone, _, out, _ = saved
    marker = tmp_path / "unpickled.txt"
    payload = {"head.weight": _Bomb(str(marker))}
    target = out / TENSORS
    if kind == "torch-zip":
        torch.save(payload, target)
    elif kind == "torch-legacy":
        torch.save(payload, target, _use_new_zipfile_serialization=False)
    else:
        target.write_bytes(pickle.dumps(payload, protocol=4))
    # even with the json's checksum updated to match, the file must not be unpickled
    meta = json.loads((out / META).read_text())
    meta["tensors_sha256"] = sha256_file(target)
    _write_meta(out, meta)

    err = _refusal(out, backbone)
    assert "pickle" in err.what and "never unpickles" in err.what
    assert not marker.exists()
    assert "UNPICKLED" not in capfd.readouterr().out


def test_refuses_a_file_that_is_not_safetensors(saved):
    backbone, _, out, _ = saved
    (out / TENSORS).write_bytes(b"this is not a tensor file at all")
    meta = json.loads((out / META).read_text())
    meta["tensors_sha256"] = sha256_file(out / TENSORS)
    _write_meta(out, meta)
    err = _refusal(out, backbone)
    assert "not a readable safetensors file" in err.what


def test_refuses_a_missing_tensor(saved):
    backbone, model, out, _ = saved
    tensors = load_file(str(out / TENSORS))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    _rewrite_tensors(out, tensors)
    err = _refusal(out, backbone)
    assert "missing tensors" in err.what and dropped in err.what
    assert "re-train or restore" in err.fix


def test_refuses_an_extra_tensor(saved):
    backbone, _, out, _ = saved
    tensors = load_file(str(out / TENSORS))
    tensors["blocks.0.surprise"] = torch.zeros(3)
    _rewrite_tensors(out, tensors)
    err = _refusal(out, backbone)
    assert "unexpected tensors" in err.what and "blocks.0.surprise" in err.what


def test_refuses_a_tensor_of_the_wrong_shape(saved):
    backbone, _, out, _ = saved
    tensors = load_file(str(out / TENSORS))
    tensors["head.bias"] = torch.zeros(5)
    _rewrite_tensors(out, tensors)
    with pytest.raises(VistuneError, match=r"head\.bias has shape \(5,\), expected \(3,\)"):
        load_artifact(out, backbone=backbone)


def test_refuses_a_pair_from_different_saves(tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    first, second = tmp_path / "first", tmp_path / "second"
    save_artifact(_model(backbone, seed=1), first, class_names=CLASSES, preprocessing=PREP)
    save_artifact(_model(backbone, seed=2), second, class_names=CLASSES, preprocessing=PREP)
    (second / TENSORS).write_bytes((first / TENSORS).read_bytes())  # first's tensors, second's json
    err = _refusal(second, backbone)
    assert "different saves" in err.what and "same `vistune train` run" in err.fix


def test_refuses_a_folder_that_is_not_an_artifact(tmp_path):
    with pytest.raises(VistuneError) as e:
        load_artifact(tmp_path)
    assert "not a vistune artifact" in e.value.what and "--out folder" in e.value.fix
    (tmp_path / META).write_text("{not json")
    (tmp_path / TENSORS).write_bytes(b"")
    with pytest.raises(VistuneError, match="not valid JSON"):
        load_artifact(tmp_path)


# ------------------------------------------------------------------------------------ interrupted saves
def _assert_intact(out: Path, before: dict[str, bytes], model, backbone) -> None:
    assert _files(out) == before, "the previous artifact (and nothing else) is in the folder"
    reloaded, _ = load_artifact(out, backbone=backbone)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_save_interrupted_while_writing_tensors_keeps_the_previous_artifact(saved, monkeypatch):
    backbone, model, out, _ = saved
    before = _files(out)

    def half_written(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # a partial file on disk, then the "crash"
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts_mod, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(_model(backbone, seed=7), out, class_names=CLASSES, preprocessing=PREP)
    monkeypatch.undo()
    _assert_intact(out, before, model, backbone)


@pytest.mark.parametrize("step", ["tensors", "json"])
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_artifact(saved, monkeypatch, step):
    backbone, model, out, _ = saved
    before = _files(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if step == "tensors":
        monkeypatch.setattr(artifacts_mod, "save_file", disk_full)
    else:  # the json: the writer's write() itself fails
        monkeypatch.setattr(artifacts_mod, "json_writer", lambda obj: disk_full)
    with pytest.raises(VistuneError) as e:
        save_artifact(_model(backbone, seed=7), out, class_names=CLASSES, preprocessing=PREP)
    monkeypatch.undo()
    assert e.value.what.startswith(f"no space left on the disk of {out}")
    assert "free some disk space" in e.value.fix and "unchanged" in e.value.fix
    _assert_intact(out, before, model, backbone)  # and no temp file left beside it


def test_save_failing_after_the_tensors_keeps_the_previous_artifact(saved):
    """The json step fails (here: an unserialisable value) after the new tensor file was written:
    the old json must not end up beside the new tensors."""
    backbone, model, out, _ = saved
    before = _files(out)
    with pytest.raises(TypeError):
        save_artifact(_model(backbone, seed=7), out, class_names=CLASSES, preprocessing=PREP,
                      extra={"not_json": object()})
    _assert_intact(out, before, model, backbone)
