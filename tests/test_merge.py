"""Merging: a plain timm model with the adapted model's logits and the bare backbone's structure;
`vistune export --merged/--peft`."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import IMAGE_SIZE
from vistune.artifacts import load_artifact, save_artifact
from vistune.cli import main
from vistune.errors import VistuneError
from vistune.merge import inference_preprocessing, merge
from vistune.methods import METHODS, adapt, make_config
from vistune.run import Job, preprocessing_for, transforms_for

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
    prep = preprocessing_for(backbone, Job(backbone="vit", method="lora", data="", image_size=IMAGE_SIZE,
                                           normalization="paper"))
    save_artifact(model, tmp_path / "art", class_names=["a", "b", "c"], preprocessing=prep)
    merged_file, peft_dir = tmp_path / "merged.safetensors", tmp_path / "peft"
    assert main(["export", "--adapter", str(tmp_path / "art"), "--merged", str(merged_file),
                 "--peft", str(peft_dir)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    with safe_open(str(merged_file), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "timm-state-dict" and meta["num_classes"] == "3"
    assert json.loads(meta["class_names"]) == ["a", "b", "c"]
    # the input preprocessing travels with the weights, and is the very transform vistune evaluates with
    pre = json.loads(meta["preprocessing"])
    assert pre["image_size"] == IMAGE_SIZE and pre["resize"] == [IMAGE_SIZE, IMAGE_SIZE]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    from torchvision import transforms as T

    rebuilt = T.Compose([T.Resize(pre["resize"], interpolation=T.InterpolationMode(pre["interpolation"])),
                         T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    assert torch.equal(rebuilt(image), transforms_for(prep)[1](image))
    assert f"resize to {IMAGE_SIZE}×{IMAGE_SIZE} ({pre['interpolation']})" in printed
    assert "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in printed
    timm_model = timm.create_model(meta["architecture"], num_classes=int(meta["num_classes"]),
                                   **json.loads(meta["model_kwargs"]))
    timm_model.load_state_dict(load_file(merged_file))  # strict: exactly timm's keys, head incl.
    reloaded, _ = load_artifact(tmp_path / "art", backbone=backbone)
    with torch.no_grad():
        assert (timm_model.eval()(X) - reloaded(X)).abs().max() < 1e-5
    assert (peft_dir / "adapter_model.safetensors").is_file() and (peft_dir / "adapter_config.json").is_file()

    assert main(["export", "--adapter", str(tmp_path / "art")]) == 2
    assert "nothing to write" in capsys.readouterr().err


def test_merged_preprocessing_of_an_augmented_run_is_its_eval_crop(tiny_backbones):
    """FGVC-style artifacts evaluate with a resize of the shorter side and a center crop: so does the export."""
    backbone = tiny_backbones("vit")
    prep = preprocessing_for(backbone, Job(backbone="vit", method="lora", data="", image_size=IMAGE_SIZE,
                                           augment=True))
    pre = inference_preprocessing(prep)
    crop_pct = prep["data_config"]["crop_pct"]
    assert pre["resize"] == int(IMAGE_SIZE / crop_pct) and pre["center_crop"] == [IMAGE_SIZE, IMAGE_SIZE]
    assert pre["mean"] == pytest.approx(list(prep["data_config"]["mean"]))
    assert inference_preprocessing({}) is None  # an artifact that records none: nothing is made up
