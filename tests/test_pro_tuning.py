"""Pro-tuning: zero-init prompt blocks leave the frozen model exact at step 0; placement; counts; options."""
from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_SIZE, TINY
from vistune.errors import VistuneError
from vistune.methods import adapt, count_parameters, make_config
from vistune.methods.pro_tuning import Prompted

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("kind", list(TINY))
def test_step_zero_is_the_frozen_model_then_prompts_change_it(tiny_backbones, kind):
    backbone = tiny_backbones(kind)
    torch.manual_seed(0)
    model = adapt(backbone, make_config("pro-tuning", {"every": 1}), 3)
    with torch.no_grad():
        assert torch.equal(model.eval().features(X), backbone.forward_features(X))
    # two SGD steps: the zero-init expand conv moves first, then the rest of the block has a gradient
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model.train()(X), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    blocks = [m.prompt for m in model.modules() if isinstance(m, Prompted)]
    assert blocks and all(b.reduce.weight.grad.abs().sum() > 0 for b in blocks)
    with torch.no_grad():
        assert not torch.allclose(model.eval().features(X), backbone.forward_features(X))


def test_prompts_depend_on_the_input_through_a_spatial_neighbourhood(tiny_backbones):
    model = adapt(tiny_backbones("resnet"), make_config("pro-tuning", {"kernel_size": 3}), 3)
    block = next(m.prompt for m in model.modules() if isinstance(m, Prompted))
    torch.nn.init.normal_(block.expand.weight)
    x = torch.zeros(1, block.reduce.in_channels, 5, 5)
    x[..., 2, 2] = 1.0  # a single active position moves the prompt at its 3×3 neighbours, not beyond
    changed = (block(x) - block(torch.zeros_like(x))).abs().sum(1)[0] > 0
    assert changed[1:4, 1:4].all() and not changed[0].any() and not changed[:, 0].any()


def test_placement_every_k_blocks_and_selected_stages(tiny_backbones, vit_b16):
    model = adapt(vit_b16, make_config("pro-tuning"), 10)
    assert [i for i, b in enumerate(model.backbone.model.blocks) if isinstance(b, Prompted)] == [0, 3, 6, 9]
    model = adapt(tiny_backbones("resnet"), make_config("pro-tuning", {"stages": "2,3"}), 3)
    m = model.backbone.model
    assert [isinstance(getattr(m, f"layer{i}"), Prompted) for i in (1, 2, 3, 4)] == [False, False, True, True]
    swin = adapt(tiny_backbones("swin"), make_config("pro-tuning", {"every": 1}), 3)
    assert all(isinstance(b, Prompted) for layer in swin.backbone.model.layers for b in layer.blocks)


def test_vit_b16_count_formula(vit_b16):
    """4 blocks (1, 4, 7, 10 of 12) × [768·192 + 192 + 192·9 + 192 + 192·768 + 768] = 4 × 297,792."""
    counts = count_parameters(adapt(vit_b16, make_config("pro-tuning"), 100))
    d, h = 768, 192
    assert counts["tuned_params_excluding_head"] == 4 * (d * h + h + h * 9 + h + h * d + d) == 1_191_168


@pytest.mark.parametrize("sets,match", [({"kernel_size": "2"}, "odd"), ({"stages": "a,b"}, "list of indices"),
                                        ({"every": "0"}, "≥ 1")])
def test_bad_options_are_refused(sets, match):
    with pytest.raises(VistuneError, match=match):
        make_config("pro-tuning", sets)


def test_out_of_range_stage_is_refused(tiny_backbones):
    with pytest.raises(VistuneError, match="has 4 insertion points"):
        adapt(tiny_backbones("resnet"), make_config("pro-tuning", {"stages": "4"}), 3)
