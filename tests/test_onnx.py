"""`vistune export --onnx`: merged where the method merges, the adapted (or PGN's deploy) graph otherwise; the
file's logits match PyTorch's in onnxruntime on random and real images; the preprocessing is in its metadata."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from artifact_factory import make_artifact, methods_for
from conftest import tiny_backbone
from vistune.artifacts import load_artifact
from vistune.cli import main
from vistune.errors import VistuneError
from vistune.onnx_export import TOLERANCE, export_onnx, max_abs_diff
from vistune.run import transforms_for


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _real_images(meta: dict, n: int = 4) -> torch.Tensor:
    """Handwritten digits (sklearn's real scans), through the artifact's own eval transform."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:n]
    tf = transforms_for(meta["preprocessing"])[1]
    return torch.stack([tf(Image.fromarray((d * 16).astype(np.uint8)).convert("RGB")) for d in digits])


def _export_and_check(backbone, method, tmp_path, **sets):
    path = make_artifact(backbone, method, tmp_path / method, seed=5, sets=sets)
    model, meta = load_artifact(path, backbone=backbone)
    out = tmp_path / f"{method}.onnx"
    report = export_onnx(model, out, meta)
    data = out.read_bytes()
    model.deploy = False  # PGN: compare with the latent forward it was trained with
    assert report["max_abs_diff"] <= TOLERANCE
    assert max_abs_diff(data, model, 32, _real_images(meta)) <= TOLERANCE
    return report, onnx.load_from_string(data), meta


def _expected_graph(method: str) -> str:
    from vistune.methods import METHODS

    cls = METHODS[method].method_class
    return "merged" if cls.mergeable else "deploy" if cls.deployable else "adapted"


@pytest.mark.parametrize("method", [m for m in methods_for("vit") if m != "vpt-pad"])
def test_every_method_exports_on_vit_and_matches_pytorch_in_onnxruntime(tiny_backbones, tmp_path, method):
    report, proto, meta = _export_and_check(tiny_backbones("vit"), method, tmp_path)
    assert report["graph"] == _expected_graph(method)
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # any batch size


@pytest.mark.parametrize("kind,method", [("swin", "vpt-deep"), ("swin", "sct"), ("swin", "lora"),
                                         ("mobilenet", "adapter"), ("mobilenet", "ssf"),
                                         ("mobilenet", "pro-tuning")])
def test_other_families_export_too(tiny_backbones, tmp_path, kind, method):
    report, _, _ = _export_and_check(tiny_backbones(kind), method, tmp_path)
    assert report["graph"] == _expected_graph(method)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["swin", "mobilenet", "efficientnet"])
def test_every_method_exports_on_every_family(tmp_path, kind):
    backbone = tiny_backbone(kind)
    for method in methods_for(backbone.family):
        if method != "vpt-pad":
            _export_and_check(backbone, method, tmp_path)
    if kind != "swin":  # a grown canvas changes the input size, which Swin's fixed windows do not take
        _export_and_check(backbone, "vpt-pad", tmp_path, canvas="grow")


def test_the_metadata_holds_the_preprocessing_classes_and_backbone(tiny_backbones, tmp_path):
    _, proto, meta = _export_and_check(tiny_backbones("vit"), "adapter", tmp_path)
    props = {p.key: p.value for p in proto.metadata_props}
    steps = json.loads(props["vistune.preprocessing"])["steps"]
    assert [s["op"] for s in steps] == ["resize", "to_tensor", "normalize"]
    assert steps[0]["size"] == [32, 32] and steps[0]["interpolation"] == "bilinear"
    assert steps[2]["mean"] == pytest.approx([0.5, 0.4, 0.3]) and steps[2]["std"] == pytest.approx([0.2, 0.25, 0.3])
    assert json.loads(props["vistune.class_names"]) == meta["class_names"]
    assert json.loads(props["vistune.backbone"])["fingerprint"] == meta["backbone"]["fingerprint"]
    assert props["vistune.method"] == "adapter" and props["vistune.graph"] == "adapted"


def test_vpt_pad_with_a_shrunk_canvas_is_refused_with_the_reason(tiny_backbones, tmp_path):
    backbone = tiny_backbones("mobilenet")
    path = make_artifact(backbone, "vpt-pad", tmp_path / "pad")
    model, meta = load_artifact(path, backbone=backbone)
    with pytest.raises(VistuneError, match="antialiased resize") as refused:
        export_onnx(model, tmp_path / "pad.onnx", meta)
    assert "canvas=grow" in refused.value.fix
    assert not (tmp_path / "pad.onnx").exists()
    _export_and_check(backbone, "vpt-pad", tmp_path, canvas="grow")  # the grown canvas has no resize: it exports


def test_vistune_export_onnx_writes_a_checked_file(tiny_backbones, tmp_path, capsys):
    path = make_artifact(tiny_backbones("vit"), "lora", tmp_path / "lora")
    assert main(["export", "--adapter", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    assert onnx.load(str(tmp_path / "m.onnx")).graph.output[0].name == "logits"
