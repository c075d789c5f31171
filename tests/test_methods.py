"""The method × backbone-family matrix on tiny random timm models (fast, no download)."""
from __future__ import annotations

import pytest
import torch

import timm
from conftest import IMAGE_SIZE, TINY
from vistune.backbones import view_class_for
from vistune.artifacts import load_artifact, save_artifact
from vistune.errors import VistuneError
from vistune.methods import METHODS, adapt, make_config

FAMILY_KINDS = ["vit", "vit_reg_avg", "deit_distilled", "swin", "efficientnet", "resnet", "convnext", "mobilenet"]
OVERRIDES = {"sidetune": {"side_network": "mobilenetv3_small_050", "side_pretrained": False},
             "partial": {"k": 1}, "mlp": {"k": 2}, "vpt-shallow": {"num_tokens": 3},
             "vpt-deep": {"num_tokens": 3, "project_dim": 8}, "vpt-pad": {"width": 2, "image_size": IMAGE_SIZE},
             "pgn": {"num_prompts": 3, "library_size": 8, "generator_width": 4},
             "fact-tk": {"rank": 4}, "e2vpt": {"num_prompts": 3, "num_kv": 2}, "fourierft": {"n_frequency": 64}}


NO_LINEAR_KINDS = ["efficientnet", "resnet", "convnext", "mobilenet"]  # tiny CNNs whose forward calls no nn.Linear


def _linear_only(name) -> bool:
    """peft methods whose layers take nn.Linear only: they refuse a CNN without one (test below)."""
    return getattr(METHODS[name].method_class, "linear_only", False)


def _cases():
    for name, info in sorted(METHODS.items()):
        for kind in FAMILY_KINDS:
            if _linear_only(name) and kind in NO_LINEAR_KINDS:
                continue
            if info.supports(view_class_for(timm.create_model(TINY[kind][0], pretrained=False, **TINY[kind][1]))):
                yield pytest.param(name, kind, id=f"{name}-{kind}")


def _step(model, x, y, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    return opt


@pytest.mark.parametrize("name,kind", list(_cases()))
def test_method_matrix(name, kind, tiny_backbones, tmp_path):
    backbone = tiny_backbones(kind)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    torch.manual_seed(0)
    model = adapt(backbone, make_config(name, OVERRIDES.get(name)), num_classes=3)
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.tensor([0, 1, 2, 0])

    opt = _step(model, x, y)
    # only the method's parameters receive gradients
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= trainable
    non_head = {n for n in trainable if not n.startswith("head.")}
    assert bool(non_head) == (name not in ("linear", "mlp"))  # head-only methods train nothing else
    frozen_before = {k: v.clone() for k, v in model.frozen_state().items()}
    opt.step()
    # the caller's backbone and the model's frozen tensors are bit-identical after a step
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(frozen_before[k], v) for k, v in model.frozen_state().items())
    # the tuned parameters did move
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # save → load gives identical logits
    save_artifact(model, tmp_path, class_names=["a", "b", "c"], preprocessing={})
    model.eval()
    reloaded, meta = load_artifact(tmp_path, backbone=backbone)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    assert meta["method"] == name


@pytest.mark.parametrize("name", sorted(n for n in METHODS if _linear_only(n)))
def test_linear_only_peft_methods_refuse_cnns_without_linears(name, tiny_backbones):
    with pytest.raises(VistuneError, match="targets='linear' matches no module"):
        adapt(tiny_backbones("efficientnet"), make_config(name), 3)
    with pytest.raises(VistuneError, match="hold only for nn.Linear"):
        adapt(tiny_backbones("resnet"), make_config(name, {"targets": "conv"}), 3)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_head_only_methods_tune_nothing_in_backbone(name, tiny_backbones):
    model = adapt(tiny_backbones("vit"), make_config(name), 3)
    assert all(n.startswith("head.") for n, p in model.named_parameters() if p.requires_grad)


def test_bias_tunes_exactly_the_bias_terms(tiny_backbones):
    model = adapt(tiny_backbones("vit"), make_config("bias"), 3)
    tuned = {n for n, p in model.backbone.model.named_parameters() if p.requires_grad}
    assert tuned and all("bias" in n for n in tuned)
    assert tuned == {n for n, _ in model.backbone.model.named_parameters() if "bias" in n}


def test_partial_tunes_last_blocks_and_final_norm(tiny_backbones):
    model = adapt(tiny_backbones("vit"), make_config("partial-1"), 3)
    tuned = {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("blocks") else n.split(".")[0]
             for n, p in model.backbone.model.named_parameters() if p.requires_grad}
    assert tuned == {"blocks.1", "norm"}
    with pytest.raises(VistuneError, match="only 2 blocks"):
        adapt(tiny_backbones("vit"), make_config("partial-5"), 3)


def test_adapter_vpt_init_only_up_bias_learns(tiny_backbones):
    """The official VPT init (all zeros) leaves every weight gradient zero: the bug we document."""
    model = adapt(tiny_backbones("vit"), make_config("adapter", {"init": "vpt"}), 3)
    _step(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    grads = {n: p.grad for n, p in model.named_parameters() if "adapter" in n}
    assert all(g.abs().sum() == 0 for n, g in grads.items() if n.endswith("weight"))
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("up.bias"))
    learn = adapt(tiny_backbones("vit"), make_config("adapter"), 3)
    _step(learn, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert any(p.grad.abs().sum() > 0 for n, p in learn.named_parameters() if n.endswith("up.weight"))


def test_adapter_starts_as_identity(tiny_backbones):
    backbone = tiny_backbones("efficientnet")
    x = torch.randn(2, 3, 32, 32)
    model = adapt(backbone, make_config("adapter"), 3).eval()
    with torch.no_grad():
        assert torch.allclose(model.features(x), backbone.forward_features(x), atol=1e-6)


def test_unknown_method_and_option_errors_suggest():
    with pytest.raises(VistuneError, match="Did you mean 'adapter'"):
        make_config("adaptor")
    with pytest.raises(VistuneError, match="valid keys: reduction, init"):
        make_config("adapter", {"reductoin": "8"})
    with pytest.raises(VistuneError, match="not one of"):
        make_config("adapter", {"init": "zeros"})
    with pytest.raises(VistuneError, match="not a valid int"):
        make_config("adapter", {"reduction": "eight"})


def test_family_support_is_checked(tiny_backbones):
    assert METHODS["linear"].families == ("any",)
    assert METHODS["vpt-deep"].families == ("vit", "eva", "beit", "swin", "swinv2")
    with pytest.raises(VistuneError, match="does not support the generic family.*needs 'tokens' or 'window-prompts'"):
        adapt(tiny_backbones("efficientnet"), make_config("vpt-deep"), 3)
    with pytest.raises(VistuneError, match="at least 2 classes"):
        adapt(tiny_backbones("vit"), make_config("linear"), 1)


def test_moving_an_adapted_model_never_moves_the_callers_backbone(tiny_backbones):
    """.to() swaps a Parameter's data in place; shared frozen weights must not follow (a CUDA bug)."""
    backbone = tiny_backbones("efficientnet")
    model = adapt(backbone, make_config("linear"), 3)
    first = next(iter(model.backbone.model.parameters()))
    assert first.data_ptr() == next(iter(backbone.model.parameters())).data_ptr()  # no copy on the same device
    model.to(torch.float64)
    assert all(t.dtype == torch.float32 for t in backbone.model.state_dict().values() if t.is_floating_point())
    adapt(backbone, make_config("adapter"), 3)(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))  # still consistent
