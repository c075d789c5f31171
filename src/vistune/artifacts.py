"""Per-task artifacts: ``adapter.safetensors`` (tuned tensors only) + ``adapter.json`` (the rest).

Writes are atomic (temp file + rename). ``adapter.json`` records the sha256 of the tensor file,
so a pair that does not belong together is detected. Loading never unpickles anything, and
refuses a backbone whose weights differ from the one the artifact was trained on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from ._io import atomic_write_group, json_writer, sha256_file
from .backbones import BackboneView, load_backbone
from .errors import VistuneError
from .methods import Method, adapt, count_parameters, make_config

TENSORS = "adapter.safetensors"
META = "adapter.json"
FORMAT = "vistune-adapter"
FORMAT_VERSION = 1


def save_artifact(model: Method, out_dir: str | os.PathLike, *, class_names: list[str],
                  preprocessing: dict, extra: dict | None = None) -> int:
    """Write the artifact into ``out_dir``; returns its size in bytes (both files).

    Both files are first written in full to temp files and only then renamed over the old ones,
    so a save that fails or is interrupted leaves the previous artifact intact (a new tensor file
    never ends up beside the old json).
    """
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
        "class_names": list(class_names),
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

    atomic_write_group([(out / TENSORS, write_tensors), (out / META, json_writer(meta))])
    return artifact_bytes(out)


def artifact_bytes(out_dir: str | os.PathLike) -> int:
    out = Path(out_dir)
    return (out / TENSORS).stat().st_size + (out / META).stat().st_size


def read_meta(out_dir: str | os.PathLike) -> dict:
    out = Path(out_dir)
    meta_path, tensor_path = out / META, out / TENSORS
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise VistuneError(
                f"{p} not found: {out} is not a vistune artifact",
                "pass the --out folder of a `vistune train` run (it holds adapter.json and adapter.safetensors)",
            )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise VistuneError(f"{meta_path} is not valid JSON ({e})", "re-run the training that wrote it") from None
    if meta.get("format") != FORMAT:
        raise VistuneError(f"{meta_path} is not a vistune adapter file (format={meta.get('format')!r})",
                           "pass the --out folder of a `vistune train` run")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise VistuneError(
            f"{meta_path} has format version {meta['format_version']}; this vistune reads ≤ {FORMAT_VERSION}",
            "upgrade vistune",
        )
    return meta


def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(16)
    # A pickle (torch.save) starts with 0x80 or a zip header; never hand such a file to unpickling.
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise VistuneError(
            f"{path} is a pickle/zip file, not safetensors; vistune never unpickles artifacts",
            "re-save the adapter with vistune (it writes safetensors)",
        )
    if sha256_file(path) != meta.get("tensors_sha256"):
        raise VistuneError(
            f"{path} does not match {path.parent / META} (checksum differs): the two files are from "
            "different saves, or one was modified",
            "restore both files from the same `vistune train` run",
        )
    try:
        return load_file(str(path))
    except (SafetensorError, Exception) as e:
        raise VistuneError(f"{path} is not a readable safetensors file ({e})",
                           "restore both files from the same `vistune train` run, or re-train") from None


def backbone_for(meta: dict) -> BackboneView:
    """Rebuild the backbone an artifact names (same name, same checkpoint file or same random init)."""
    b = meta["backbone"]
    return load_backbone(
        b["name"],
        checkpoint=b.get("checkpoint"),
        random_init=b["source"] == "random-init",
        model_kwargs=b.get("model_kwargs") or {},
    )


def load_artifact(out_dir: str | os.PathLike, backbone: BackboneView | None = None,
                  device: str | torch.device = "cpu") -> tuple[Method, dict]:
    """Rebuild the adapted model of an artifact; returns (model in eval mode, metadata)."""
    out = Path(out_dir)
    meta = read_meta(out)
    tensors = _read_tensors(out / TENSORS, meta)
    if backbone is None:
        backbone = backbone_for(meta)
    want = meta["backbone"]["fingerprint"]
    if backbone.fingerprint() != want:
        b = meta["backbone"]
        how = f"--checkpoint {b['checkpoint']}" if b.get("checkpoint") else f"--backbone {b['name']}"
        raise VistuneError(
            f"{out} was trained on backbone {b['name']!r} with weights {want[:12]}…, but the given "
            f"backbone {backbone.spec.name!r} has weights {backbone.fingerprint()[:12]}…",
            f"load it with the backbone it was trained on ({how}, source {b['source']})",
        )
    config = make_config(meta["method"], meta["config"])
    model = adapt(backbone, config, meta["num_classes"], task=meta.get("task", "classification"))
    expected = model.tuned_state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise VistuneError(
            f"{out / TENSORS} does not fit method {meta['method']!r}: missing tensors {missing[:5]}, "
            f"unexpected tensors {extra[:5]}",
            "the file was edited or comes from another vistune version; re-train or restore it",
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise VistuneError(
                f"{out / TENSORS}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}",
                "the file was edited or comes from another vistune version; re-train or restore it",
            )
    model.load_state_dict(tensors, strict=False)
    return model.to(device).eval(), meta
