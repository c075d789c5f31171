"""Merging: a plain timm model with the adapted model's logits and the bare backbone's structure;
`vistune export --merged/--peft`."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import IMAGE_SIZE
from vistune.artifacts import load_artifact, save_artifact
from vistune.cli import main
from vistune.errors import VistuneError
from vistune.merge import merge
from vistune.methods import METHODS, adapt, make_config

X = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
MERGEABLE = ["lora", "dora", "ia3", "ln-tuning", "ssf", "bias", "fact-tt", "fact-tk", "difffit", "vera", "oft", "boft",
             "fourierft"]
# transformer-only methods and peft methods with Linear-only layers do not apply to the tiny EfficientNet
ON_CNNS = [n for n in MERGEABLE if not METHODS[n].needs and not getattr(METHODS[n].method_class, "linear_only", False)]
CASES = [(n, k) for k in ("vit", "swin", "efficientnet") for n in MERGEABLE if k != "efficientnet" or n in ON_CNNS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _adapted(backbone, name, **sets):
    torch.manual_seed(0)
    model = adapt(backbone, make_config(name, sets), 3)
    with torch.no_grad():  # move every tuned tensor off its (identity) init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _stock_with_head(backbone):
    stock = copy.deepcopy(backbone.model)
    stock.reset_classifier(3)
    return stock


@pytest.mark.parametrize("name,kind", CASES)
def test_merged_model_is_stock_timm_with_the_same_logits(tiny_backbones, name, kind):
    backbone = tiny_backbones(kind)
    sets = {"targets": "qv+mlp"} if name == "lora" and kind != "efficientnet" else {"rank": 4} if name == "fact-tk" else {}
    model = _adapted(backbone, name, **sets)
    with torch.no_grad():
        adapted = model(X)
        merged = merge(model)
        assert (merged(X) - adapted).abs().max() < 1e-5  # fp32: only the summation order differs
        assert torch.equal(model(X), adapted)  # merging worked on a copy
    stock = _stock_with_head(backbone)
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in stock.named_modules()]
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in stock.parameters())
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}


@pytest.mark.parametrize("name,sets", [("adapter", {"reduction": 4}), ("vpt-shallow", {"num_tokens": 2})])
def test_methods_that_add_computation_cannot_merge(tiny_backbones, name, sets):
    with pytest.raises(VistuneError, match="cannot merge"):
        merge(adapt(tiny_backbones("vit"), make_config(name, sets), 3))


def test_vistune_export_writes_a_plain_timm_state_dict_and_peft_folder(tiny_backbones, tmp_path, capsys):
    backbone = tiny_backbones("vit")
    model = _adapted(backbone, "lora", targets="qv")
    save_artifact(model, tmp_path / "art", class_names=["a", "b", "c"], preprocessing={})
    merged_file, peft_dir = tmp_path / "merged.safetensors", tmp_path / "peft"
    assert main(["export", "--adapter", str(tmp_path / "art"), "--merged", str(merged_file),
                 "--peft", str(peft_dir)]) == 0
    with safe_open(str(merged_file), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "timm-state-dict" and meta["num_classes"] == "3"
    timm_model = timm.create_model(meta["architecture"], num_classes=int(meta["num_classes"]),
                                   **json.loads(meta["model_kwargs"]))
    timm_model.load_state_dict(load_file(merged_file))  # strict: exactly timm's keys, head incl.
    reloaded, _ = load_artifact(tmp_path / "art", backbone=backbone)
    with torch.no_grad():
        assert (timm_model.eval()(X) - reloaded(X)).abs().max() < 1e-5
    assert (peft_dir / "adapter_model.safetensors").is_file() and (peft_dir / "adapter_config.json").is_file()

    assert main(["export", "--adapter", str(tmp_path / "art")]) == 2
    assert "nothing to write" in capsys.readouterr().err
