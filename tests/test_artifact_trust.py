"""Artifacts that always reload, and an adapter.json that is checked before anything is built.

Every safetensors header length reloads (a header length of 128 mod 256 makes the file start with 0x80,
pickle's PROTO opcode); pickles and zips are refused by name and never unpickled; adapter.json's fields,
types and checksum, and its fit to the tensor file's header, are checked before a backbone is loaded or a
module allocated; artifacts of format 1 (vistune 0.1.0, no json checksum) still load, with a warning.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vistune.artifacts as artifacts_mod
from conftest import IMAGE_SIZE, TINY, tiny_backbone
from vistune._io import sha256_file
from vistune.artifacts import META, META_CHECKSUM, TENSORS, load_artifact, read_meta, save_artifact
from vistune.backbones import load_backbone
from vistune.errors import VistuneError
from vistune.methods import METHODS, adapt, make_config

CLASSES = ["a", "b", "c"]
PREP = {"image_size": IMAGE_SIZE, "normalization": "pretrained_cfg", "augment": False}
X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _model(backbone, method="adapter", overrides=None, seed=0):
    torch.manual_seed(seed)
    model = adapt(backbone, make_config(method, overrides or ({"reduction": 4} if method == "adapter" else {})), 3)
    with torch.no_grad():  # every tuned tensor non-trivial (adapter "up" starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _meta(out: Path) -> dict:
    return json.loads((out / META).read_text())


def _write_meta(out: Path, meta: dict, *, resign: bool = True) -> None:
    """Write an edited adapter.json; ``resign``: with its checksum updated, as a careful editor would."""
    if resign and META_CHECKSUM in meta:
        meta[META_CHECKSUM] = artifacts_mod.meta_checksum(meta)
    (out / META).write_text(json.dumps(meta))


def _as_format_1(out: Path) -> dict:
    """Turn a saved artifact into what vistune 0.1.0 wrote: format 1, no checksum of the json."""
    meta = _meta(out)
    del meta[META_CHECKSUM]
    meta["format_version"] = 1
    _write_meta(out, meta)
    return meta


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.fixture()
def saved(tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    model = _model(backbone)
    out = tmp_path / "art"
    save_artifact(model, out, class_names=CLASSES, preprocessing=PREP)
    return backbone, model, out


@pytest.fixture()
def nothing_built(monkeypatch):
    """Loading must refuse before it loads a backbone or builds a module: both fail the test if called."""
    def fail(*args, **kwargs):
        raise AssertionError("load_artifact built something before refusing")

    monkeypatch.setattr(artifacts_mod, "adapt", fail)
    monkeypatch.setattr(artifacts_mod, "backbone_for", fail)
    monkeypatch.setattr(artifacts_mod, "load_file", fail)  # no tensor data read either


def _refusal(out, backbone=None) -> VistuneError:
    with pytest.raises(VistuneError) as e:
        load_artifact(out, backbone=backbone)
    assert e.value.what and e.value.fix, "every refusal says what is wrong and how to fix it"
    return e.value


# ----------------------------------------------------------------------------------- every header length
def _save_padded(model, out: Path, pad: int, monkeypatch) -> Path:
    """save_artifact with ``pad`` more bytes of header metadata: safetensors pads its header to a multiple of 8,
    so pads 0, 8, …, 248 give header lengths of all 32 classes mod 256."""
    real_save_file = artifacts_mod.save_file

    def padded(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata={**(metadata or {}), "pad": "x" * pad})

    with monkeypatch.context() as m:
        m.setattr(artifacts_mod, "save_file", padded)
        save_artifact(model, out, class_names=CLASSES, preprocessing=PREP)
    return out / TENSORS


def _pad_starting_with_0x80(model, tmp_path: Path, monkeypatch) -> int:
    """The pad whose header length is 128 mod 256: the file's first byte is 0x80, pickle's PROTO opcode."""
    length = _header_length(_save_padded(model, tmp_path / "probe", 0, monkeypatch))
    return (128 - length) % 256


def test_every_header_length_mod_256_reloads_to_identical_logits(saved, tmp_path, monkeypatch):
    backbone, model, _ = saved
    with torch.no_grad():
        want = model(X)
    residues, first_bytes = set(), set()
    for pad in range(0, 256, 8):
        path = _save_padded(model, tmp_path / f"pad{pad}", pad, monkeypatch)
        residues.add(_header_length(path) % 256)
        first_bytes.add(path.read_bytes()[0])
        reloaded, _ = load_artifact(path.parent, backbone=backbone)
        with torch.no_grad():
            assert torch.equal(reloaded(X), want), f"header length {_header_length(path)}"
    assert residues == set(range(0, 256, 8)), "all 32 classes of header length mod 256 were saved and reloaded"
    assert 0x80 in first_bytes


# the method × family pairs of the user report whose artifacts could never be loaded, on tiny models
@pytest.mark.parametrize("kind,method", [("vit", "lora"), ("deit_distilled", "lora"), ("swin", "adapter"),
                                         ("resnet", "ssf"), ("efficientnet", "ia3"), ("mobilenet", "partial")])
def test_a_header_starting_with_0x80_reloads_for_each_reported_method(tiny_backbones, tmp_path, monkeypatch,
                                                                       kind, method):
    backbone = tiny_backbones(kind)
    model = _model(backbone, method)
    path = _save_padded(model, tmp_path / "art", _pad_starting_with_0x80(model, tmp_path, monkeypatch), monkeypatch)
    assert path.read_bytes()[:1] == b"\x80"
    reloaded, _ = load_artifact(path.parent, backbone=backbone)
    with torch.no_grad():
        assert torch.equal(reloaded(X), model(X))


def test_a_damaged_safetensors_file_starting_with_0x80_is_not_called_a_pickle(saved, tmp_path, monkeypatch):
    backbone, model, _ = saved
    path = _save_padded(model, tmp_path / "art", _pad_starting_with_0x80(model, tmp_path, monkeypatch), monkeypatch)
    assert path.read_bytes()[:1] == b"\x80"
    path.write_bytes(path.read_bytes()[:-4])  # truncated tensor data
    err = _refusal(path.parent, backbone)
    assert "not a readable safetensors file" in err.what and "pickle" not in err.what


# --------------------------------------------------------------------------------- pickles and zips
class _Bomb:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


@pytest.fixture()
def no_unpickling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("load_artifact tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, fail)
    monkeypatch.setattr(torch, "load", fail)


@pytest.mark.parametrize("kind,named", [("torch-zip", "zip archive"), ("torch-legacy", "pickle (protocol 2"),
                                        ("pickle-5", "pickle (protocol 5"), ("plain-zip", "zip archive")])
def test_a_pickle_or_zip_in_place_of_the_tensors_is_named_and_never_unpickled(saved, tmp_path, kind, named,
                                                                              no_unpickling, nothing_built):
    _, _, out = saved
    marker = tmp_path / "unpickled.txt"
    payload = {"head.weight": _Bomb(str(marker))}
    target = out / TENSORS
    if kind == "torch-zip":
        torch.save(payload, target)
    elif kind == "torch-legacy":
        torch.save(payload, target, _use_new_zipfile_serialization=False)
    elif kind == "pickle-5":
        target.write_bytes(pickle.dumps(payload, protocol=5))
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(payload))
        target.write_bytes(buf.getvalue())
    # the json still names the real tensor file's checksum: the file is named for what it is, not "modified"
    err = _refusal(out)
    assert named in err.what and "never unpickles" in err.what and "re-save" in err.fix
    assert not marker.exists()


# --------------------------------------------------------------------------- adapter.json's fields
REQUIRED = ["format_version", "vistune_version", "method", "config", "num_classes", "class_names", "backbone",
            "preprocessing", "tensors_sha256", "tensors", META_CHECKSUM, "backbone.name", "backbone.source",
            "backbone.fingerprint"]


def _edit(meta: dict, dotted: str, value=None, *, delete: bool = False) -> None:
    *parents, key = dotted.split(".")
    obj = meta
    for p in parents:
        obj = obj[p]
    if delete:
        del obj[key]
    else:
        obj[key] = value


@pytest.mark.parametrize("field", REQUIRED)
def test_a_missing_field_is_named_before_anything_is_built(saved, nothing_built, field):
    _, _, out = saved
    meta = _meta(out)
    _edit(meta, field, delete=True)
    _write_meta(out, meta)
    err = _refusal(out)
    assert f"field {field!r} is missing" in err.what and str(out / META) in err.what
    assert "restore" in err.fix


WRONG = [
    ("num_classes", "3", "an integer"), ("num_classes", 3.0, "an integer"), ("num_classes", True, "an integer"),
    ("num_classes", 1, "at least 2"), ("format_version", 0, "at least 1"),
    ("class_names", "abc", "a list"), ("class_names", [1, 2, 3], "a list of strings"),
    ("config", [4], "a JSON object"), ("method", 7, "a string"), ("task", "detection", "one of"),
    ("preprocessing", None, "a JSON object"), ("preprocessing.image_size", "32", "an integer"),
    ("preprocessing.image_size", 0, "a positive integer"), ("preprocessing.augment", "no", "true or false"),
    ("tensors", ["head.bias"], "a JSON object"), ("tensors.head.bias", [3.0], "a shape"),
    ("tensors.head.bias", [-3], "a shape"), ("tensors_sha256", "abc", "a sha256"),
    ("backbone.fingerprint", 12, "a string"), ("backbone.model_kwargs", [], "a JSON object"),
    ("backbone.checkpoint", "/x.safetensors", "null for source 'random-init'"), ("data", "digits", "a JSON object"),
    ("data.train_size", "800", "an integer"), (META_CHECKSUM, "0" * 63, "a sha256"),
]


@pytest.mark.parametrize("field,value,expected", WRONG, ids=[f"{f}={v!r}" for f, v, _ in WRONG])
def test_a_field_of_the_wrong_type_or_range_is_named_before_anything_is_built(saved, nothing_built, field,
                                                                               value, expected):
    _, _, out = saved
    meta = _meta(out)
    if field.startswith("tensors."):  # tensor names hold dots: tensors.<name>
        meta["tensors"][field.removeprefix("tensors.")] = value
    elif field == "data.train_size":
        meta["data"] = {"spec": "digits", "train_size": value}
    else:
        _edit(meta, field, value)
    _write_meta(out, meta, resign=field != META_CHECKSUM)
    err = _refusal(out)
    assert f"field {field!r} must be {expected}" in err.what, err.what


@pytest.mark.parametrize("names,message", [(["a", "b"], "class_names has 2 names but num_classes is 3"),
                                           (["a", "b", "a"], "more than once: ['a']")])
def test_class_names_must_be_distinct_one_per_class(saved, nothing_built, names, message):
    _, _, out = saved
    meta = _meta(out)
    meta["class_names"] = names
    _write_meta(out, meta)
    assert message in _refusal(out).what


def test_an_unknown_method_names_the_version_that_wrote_it(saved, nothing_built):
    _, _, out = saved
    meta = _meta(out)
    meta["method"], meta["vistune_version"] = "hyper-prompt", "9.9.9"
    _write_meta(out, meta)
    err = _refusal(out)
    assert "'hyper-prompt'" in err.what and "written by vistune 9.9.9" in err.what
    assert "vistune version that wrote it" in err.fix


def test_a_json_that_is_not_an_object_is_refused(saved):
    _, _, out = saved
    (out / META).write_text("[1, 2, 3]")
    with pytest.raises(VistuneError, match="not a vistune adapter file"):
        read_meta(out)


# ---------------------------------------------------------------------------- adapter.json's checksum
@pytest.mark.parametrize("edit", ["class order", "image_size", "normalization", "config", "fingerprint"])
def test_an_edited_json_is_refused_by_its_checksum(saved, nothing_built, edit):
    _, _, out = saved
    meta = _meta(out)
    if edit == "class order":
        meta["class_names"] = ["b", "a", "c"]
    elif edit == "image_size":
        meta["preprocessing"]["image_size"] = 64
    elif edit == "normalization":
        meta["preprocessing"]["normalization"] = "paper"
    elif edit == "config":
        meta["config"]["reduction"] = 2
    else:
        meta["backbone"]["fingerprint"] = "0" * 64
    _write_meta(out, meta, resign=False)
    err = _refusal(out)
    assert "modified after it was saved" in err.what and META_CHECKSUM in err.what
    assert "re-train" in err.fix
    with pytest.raises(VistuneError, match="modified after it was saved"):
        read_meta(out)  # what the CLI reads first, before it loads a backbone


def test_the_checksum_ignores_formatting_only(saved):
    backbone, model, out = saved
    meta = _meta(out)
    (out / META).write_text(json.dumps(dict(reversed(list(meta.items()))), indent=7, ensure_ascii=True))
    reloaded, _ = load_artifact(out, backbone=backbone)
    with torch.no_grad():
        assert torch.equal(reloaded(X), model(X))


def test_class_names_beyond_ascii_round_trip_under_the_checksum(saved):
    """Folder names come from os.listdir: any Unicode, and bytes that are not UTF-8 as lone surrogates."""
    backbone, model, out = saved
    names = ["café", "猫", "raw\udcff"]
    save_artifact(model, out, class_names=names, preprocessing=PREP)
    _, meta = load_artifact(out, backbone=backbone)
    assert meta["class_names"] == names


def test_the_checksum_is_over_what_the_file_holds(saved):
    _, _, out = saved
    meta = _meta(out)
    assert meta["format_version"] == artifacts_mod.FORMAT_VERSION == 2
    assert meta[META_CHECKSUM] == artifacts_mod.meta_checksum(meta)
    assert list(meta)[-1] == META_CHECKSUM  # last: it covers everything above it


# ---------------------------------------------------------------------------------------- format 1
def test_a_format_1_artifact_still_loads_with_a_warning(saved):
    backbone, model, out = saved
    _as_format_1(out)
    with pytest.warns(UserWarning, match=r"vistune 0\.1\.0 \(artifact format 1\).*cannot be detected"):
        reloaded, meta = load_artifact(out, backbone=backbone)
    with torch.no_grad():
        assert torch.equal(reloaded(X), model(X))
    assert meta["format_version"] == 1


def test_a_format_1_artifact_saved_again_gets_the_checksum(saved, recwarn):
    backbone, model, out = saved
    _as_format_1(out)
    reloaded, meta = load_artifact(out, backbone=backbone)
    save_artifact(reloaded, out, class_names=meta["class_names"], preprocessing=meta["preprocessing"])
    recwarn.clear()
    again, meta = load_artifact(out, backbone=backbone)
    assert meta["format_version"] == 2 and not [w for w in recwarn if "format 1" in str(w.message)]
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_a_format_1_artifact_is_still_fully_checked(saved, nothing_built):
    _, _, out = saved
    meta = _as_format_1(out)
    del meta["tensors"]
    _write_meta(out, meta)
    assert "field 'tensors' is missing" in _refusal(out).what


def test_a_newer_format_asks_for_a_newer_vistune(saved, nothing_built):
    _, _, out = saved
    meta = _meta(out)
    meta["format_version"] = 3
    _write_meta(out, meta)
    err = _refusal(out)
    assert "format version 3" in err.what and "upgrade vistune" in err.fix


# ------------------------------------------------------------------------ the json against the header
@pytest.mark.parametrize("legacy", [False, True], ids=["format-2", "format-1"])
def test_absurd_num_classes_is_refused_from_the_header_without_building(saved, nothing_built, legacy):
    """A json claiming 200,000 classes beside a 3-class head: refused on the header alone, not after building
    (and allocating) a 200,000-class head."""
    _, _, out = saved
    meta = _as_format_1(out) if legacy else _meta(out)
    meta["num_classes"] = 200_000
    meta["class_names"] = [f"class{i}" for i in range(200_000)]
    _write_meta(out, meta)
    with pytest.warns(UserWarning, match="format 1") if legacy else contextlib.nullcontext():
        err = _refusal(out)
    assert "the head head.weight has shape (3, 32)" in err.what and "num_classes=200000" in err.what


def test_a_json_listing_other_shapes_than_the_header_is_refused_without_building(saved, nothing_built):
    _, _, out = saved
    meta = _meta(out)
    name = next(k for k in meta["tensors"] if k != "head.weight" and len(meta["tensors"][k]) == 2)
    meta["tensors"][name] = [n * 1000 for n in meta["tensors"][name]]
    _write_meta(out, meta)
    err = _refusal(out)
    assert f"tensor {name} has shape" in err.what and "(from adapter.json)" in err.what


def test_a_json_listing_a_tensor_the_file_lacks_is_refused_without_building(saved, nothing_built):
    _, _, out = saved
    meta = _meta(out)
    meta["tensors"]["blocks.0.extra"] = [4]
    _write_meta(out, meta)
    err = _refusal(out)
    assert "missing tensors ['blocks.0.extra']" in err.what


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_the_head_output_is_found_for_every_method(tiny_backbones, task):
    """check_header's rule for the head's output layer holds for every registered method."""
    backbone = tiny_backbones("vit")
    names = [n for n, i in sorted(METHODS.items()) if task == "classification" or i.method_class.supports_segmentation]
    assert names
    for name in names:
        overrides = {"side_network": "mobilenetv3_small_050", "side_pretrained": False} if name == "sidetune" else {}
        model = adapt(backbone, make_config(name, overrides, image_size=IMAGE_SIZE), 7, task=task)
        shapes = {k: tuple(v.shape) for k, v in model.tuned_state_dict().items()}
        head = artifacts_mod._head_output(shapes)
        assert head is not None and shapes[head][0] == 7, (name, head)
        artifacts_mod.check_header({"tensors": {k: list(s) for k, s in shapes.items()}, "num_classes": 7},
                                   shapes, "adapter.safetensors")


# ---------------------------------------------------------------------------------------- saving
def test_save_refuses_class_names_that_do_not_fit_and_writes_nothing(saved):
    backbone, model, out = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for names in (["a", "b"], ["a", "a", "b"]):
        with pytest.raises(VistuneError, match="distinct strings, one per class"):
            save_artifact(model, out, class_names=names, preprocessing=PREP)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------- the backbone
def _file_backed(tmp_path: Path, name: str, seed: int):
    arch, kwargs = TINY["vit"]
    torch.manual_seed(seed)
    weights = tmp_path / f"{name}.safetensors"
    save_file(timm.create_model(arch, **kwargs).state_dict(), str(weights))
    return load_backbone(arch, checkpoint=str(weights), model_kwargs=kwargs), weights


def test_other_weights_point_to_the_checkpoint_option_that_exists(tmp_path):
    trained_on, weights = _file_backed(tmp_path, "mine", seed=1)
    out = tmp_path / "art"
    save_artifact(_model(trained_on), out, class_names=CLASSES, preprocessing=PREP)
    other, _ = _file_backed(tmp_path, "other", seed=2)
    err = _refusal(out, other)
    assert "--checkpoint FILE" in err.fix and str(weights) in err.fix and "--backbone" not in err.fix

    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    err = _refusal(out)  # the artifact names a file that is gone
    assert str(weights) in err.what and "--checkpoint FILE" in err.fix
    reloaded, _ = load_artifact(out, backbone=load_backbone(TINY["vit"][0], checkpoint=str(moved),
                                                            model_kwargs=TINY["vit"][1]))
    assert reloaded.backbone.fingerprint() == trained_on.fingerprint()


def test_other_weights_of_a_random_init_backbone_name_the_versions(saved):
    _, _, out = saved
    other = tiny_backbone("vit")
    with torch.no_grad():
        other.model.blocks[0].mlp.fc1.weight.add_(1e-3)
    err = _refusal(out, other)
    assert "seeded random init" in err.fix and "torch and timm versions" in err.fix
    assert "--backbone" not in err.fix


def test_a_tensor_file_from_another_save_is_caught_by_its_checksum(saved, tmp_path, nothing_built):
    backbone, _, out = saved
    other = tmp_path / "other"
    save_artifact(_model(backbone, seed=3), other, class_names=CLASSES, preprocessing=PREP)
    (out / TENSORS).write_bytes((other / TENSORS).read_bytes())
    assert sha256_file(out / TENSORS) != _meta(out)["tensors_sha256"]
    assert "different saves" in _refusal(out).what
