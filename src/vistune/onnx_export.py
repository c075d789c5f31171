"""ONNX export of an artifact for deployment, checked with onnxruntime against PyTorch.

The graph is the merged plain timm model for methods that merge (:mod:`vistune.merge`: the stock model's cost),
PGN's deploy path (its prompts enter the unmodified backbone as extra pixel patches), and otherwise the adapted
model itself (adapters, VPT, SCT, Pro-tuning, side-tuning, heads). The input is ``images`` (B, 3, S, S), already
preprocessed; the output ``logits`` (B, K). The batch dimension is dynamic. The ONNX file's metadata holds what a
deployment needs besides the graph: the preprocessing (as the steps of the artifact's eval transform, with
mean/std), the class names, the method, the backbone and its fingerprint.

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The dynamo exporter gives the same
operators but took 70-130 s per tiny test model on our shared 2-core machine against 3 s.
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings

import torch
from torch import nn

from . import __version__
from ._io import atomic_write
from .errors import VistuneError
from .merge import merge
from .methods import Method
from .methods.sct import SalientChannels
from .methods.vpt_pad import VPTPad

OPSET = 18
TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| on the logits


def require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise VistuneError("ONNX export needs the onnx and onnxruntime packages",
                           "pip install 'vistune[onnx]'") from None
    return onnx, onnxruntime


class _ExportSalientChannels(SalientChannels):
    """SCT's ``x[idx] += Linear(x[idx])`` with the scatter written as a matmul by the (K, D) one-hot matrix of
    ``idx``: the same numbers (each output channel gets one product by 1 plus zeros), but an ONNX graph whose batch
    size stays dynamic (the exporter's index_add bakes the traced shape in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.channel_dim % x.ndim
        onehot = torch.nn.functional.one_hot(self.index, self.dim).to(x.dtype)  # (K, D)
        selected = x.index_select(cd, self.index)
        if cd == x.ndim - 1:
            return x + self.linear(selected) @ onehot
        last = [d for d in range(x.ndim) if d != cd] + [cd]  # channels last, and back (positive dims for ONNX)
        back = sorted(range(x.ndim), key=last.__getitem__)
        return x + (self.linear(selected.permute(last)) @ onehot).permute(back)


def deploy_graph(model: Method) -> tuple[nn.Module, str]:
    """The module to export (the model itself or a copy) and what it is: "merged", "deploy" (PGN's pixel
    prompts) or "adapted"."""
    if model.task != "classification":
        raise VistuneError(f"--onnx: the {model.info.name!r} artifact is a {model.task} model",
                           "ONNX export covers classification artifacts")
    if isinstance(model, VPTPad) and model.config.canvas == "shrink":
        raise VistuneError(
            "--onnx: this vpt-pad artifact shrinks each image with an antialiased resize (canvas=shrink), which "
            "torch's ONNX exporter cannot express",
            "train vpt-pad with --set canvas=grow (no resize) to export it, or serve it with `vistune serve`")
    if model.mergeable:
        return merge(model), "merged"
    if model.deployable and getattr(model, "exact_inversion", True):
        graph = copy.deepcopy(model)
        graph.deploy = True
        return graph, "deploy"
    if any(isinstance(m, SalientChannels) for m in model.modules()):
        graph = copy.deepcopy(model)
        for m in graph.modules():
            if type(m) is SalientChannels:
                m.__class__ = _ExportSalientChannels
        return graph, "adapted"
    return model, "adapted"


def preprocessing_steps(preprocessing: dict) -> list[dict]:
    """The artifact's eval transform as data: resize / center crop / to tensor / normalize, in order."""
    from torchvision import transforms as T

    from .data.transforms import build_transforms

    _, eval_tf = build_transforms(preprocessing["data_config"], image_size=preprocessing["image_size"],
                                  normalization=preprocessing["normalization"], augment=preprocessing["augment"])
    steps = []
    for t in eval_tf.transforms:
        if isinstance(t, T.Resize):
            steps.append({"op": "resize", "size": list(t.size) if isinstance(t.size, (list, tuple)) else t.size,
                          "interpolation": t.interpolation.value, "antialias": bool(t.antialias)})
        elif isinstance(t, T.CenterCrop):
            steps.append({"op": "center_crop", "size": list(t.size)})
        elif isinstance(t, T.ToTensor):
            steps.append({"op": "to_tensor", "scale": "0..255 -> 0..1", "layout": "CHW, RGB"})
        elif isinstance(t, T.Normalize):
            steps.append({"op": "normalize", "mean": list(map(float, t.mean)), "std": list(map(float, t.std))})
        else:
            raise VistuneError(f"--onnx: the eval transform has a step {type(t).__name__} vistune cannot describe")
    return steps


def export_onnx(model: Method, path: str | os.PathLike, meta: dict, *, check: bool = True) -> dict:
    """Write ``model`` as ONNX to ``path`` (atomically); returns {"graph", "max_abs_diff", "image_size"}.

    ``check``: run the file with onnxruntime on random images and refuse it (nothing written) if its logits differ
    from PyTorch's by more than :data:`TOLERANCE`."""
    onnx, _ = require_onnx()
    graph, kind = deploy_graph(model)
    graph = graph.eval()
    prep = meta.get("preprocessing", {})
    size = prep.get("image_size") or model.backbone.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    device = next(model.parameters()).device
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            graph(example)  # caches (PGN's pseudo-inverse) are filled before tracing, so they export as constants
            torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # the exporter raises many types for an operator it cannot express
        raise VistuneError(f"--onnx: the {meta['method']!r} model cannot be exported to ONNX "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                           "deploy the vistune artifact with `vistune serve` or PyTorch instead") from None
    proto = onnx.load_from_string(buffer.getvalue())
    info = {
        "vistune.version": __version__,
        "vistune.method": meta["method"],
        "vistune.graph": kind,
        "vistune.class_names": json.dumps(meta["class_names"]),
        "vistune.preprocessing": json.dumps({"steps": preprocessing_steps(prep), "artifact": prep}) if prep else "{}",
        "vistune.backbone": json.dumps({k: meta["backbone"].get(k) for k in ("name", "architecture", "fingerprint")}),
        "vistune.input": json.dumps({"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"}),
    }
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    try:
        diff = max_abs_diff(data, model, size) if check else None
    except Exception as e:  # onnxruntime refuses the graph (an operator or shape it does not accept)
        raise VistuneError(f"--onnx: the exported {meta['method']!r} graph does not run in onnxruntime "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                           "nothing was written; deploy the vistune artifact with `vistune serve` or PyTorch") from None
    if diff is not None and not diff <= TOLERANCE:
        raise VistuneError(f"--onnx: onnxruntime's logits differ from PyTorch's by {diff:.2e} (> {TOLERANCE})",
                           "nothing was written; report this with the artifact's method and backbone")
    atomic_write(path, lambda tmp: open(tmp, "wb").write(data))
    return {"graph": kind, "max_abs_diff": diff, "image_size": size}


def max_abs_diff(onnx_bytes: bytes, model: Method, size: int, images: torch.Tensor | None = None) -> float:
    """max |onnxruntime(images) - model(images)| (random images of 3 by default: another batch size than traced)."""
    _, ort = require_onnx()
    if images is None:
        images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"images": images.cpu().numpy()})[0])
    with torch.no_grad():
        want = model(images.to(next(model.parameters()).device)).float().cpu()
    return float((got - want).abs().max())
