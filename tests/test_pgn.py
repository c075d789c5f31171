"""PGN: prompt generation, placement, exact counts, and prompt inversion (pixel deployment).

Deployment tolerance, fp32: max |logit difference| between the latent-token forward and the input-only
pixel forward < 1e-4 · max(1, max |logit|), on every ViT shape here (square, wide and tall patch
projections). Relative, because the float32 patch projection of an inverted prompt loses about
cond(W) · 6e-8 of the token's scale (a square random 588×588 projection has cond(W) in the hundreds);
the logits after one large SGD step reach ±15 here."""
from __future__ import annotations

import pytest
import torch

from vistune.backbones import load_backbone
from vistune.errors import VistuneError
from vistune.methods import adapt, count_parameters, make_config
from vistune.methods.pgn import patch_projection

DEPLOY_ATOL = 1e-4
SMALL = {"num_prompts": 4, "library_size": 16, "generator_width": 8}

# (arch, timm kwargs, image size): patch sizes 8/14/16/32; projections wide, square and tall (D > C·p²)
SHAPES = {
    "p16-square": ("vit_base_patch16_224", dict(img_size=64, embed_dim=768, depth=1, num_heads=4), 64),
    "p32-wide": ("vit_base_patch32_224", dict(img_size=64, embed_dim=192, depth=2, num_heads=3), 64),
    "p14-square-reg-avg": ("vit_base_patch16_224", dict(img_size=56, patch_size=14, embed_dim=588, depth=1,
                                                        num_heads=4, reg_tokens=4, class_token=False,
                                                        global_pool="avg"), 56),
    "p8-wide-cls-reg": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=96, depth=2,
                                                      num_heads=2, reg_tokens=1), 32),
    "p4-tall": ("vit_small_patch16_224", dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2), 32),
}


@pytest.fixture(scope="module")
def shapes():
    cache = {}

    def get(key):
        if key not in cache:
            arch, kwargs, size = SHAPES[key]
            torch.manual_seed(0)
            cache[key] = (load_backbone(arch, random_init=True, model_kwargs=kwargs), size)
        return cache[key]

    return get


def _pgn(backbone, **sets):
    torch.manual_seed(0)
    model = adapt(backbone, make_config("pgn", {**SMALL, **sets}), 5)
    # one SGD step so that library, generator and head are no longer at their init
    x = torch.randn(4, 3, *backbone.model.patch_embed.img_size)
    loss = torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    return model.eval()


@pytest.mark.parametrize("key", list(SHAPES))
def test_pixel_deployment_computes_the_latent_function(shapes, key):
    backbone, size = shapes(key)
    model = _pgn(backbone)
    weight, _ = patch_projection(backbone)
    assert model.library_space == ("pixel" if weight.shape[0] > weight.shape[1] else "token")
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        latent = model(x)
        model.deploy = True
        deployed = model(x)
        model.deploy = False
    scale = max(1.0, latent.abs().max().item())
    assert (latent - deployed).abs().max().item() < DEPLOY_ATOL * scale
    assert latent.abs().max() > 0.1  # the logits are not trivially tiny


def test_deployment_needs_only_pixels_and_a_stock_model(shapes):
    """The server side is a separately loaded stock timm model that never saw the method: it gets the
    image and the prompt strip as pixels and returns the pooled feature."""
    backbone, size = shapes("p32-wide")
    model = _pgn(backbone)
    arch, kwargs, _ = SHAPES["p32-wide"]
    server = load_backbone(arch, random_init=True, model_kwargs=kwargs)
    server.model.load_state_dict(backbone.model.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        strip = model.prompt_pixels(x)  # client side: the generator turns the image into pixels
        p = backbone.model.patch_embed.patch_size
        assert strip.shape == (2, 3, p[0], SMALL["num_prompts"] * p[1])
        logits = model.head(server.forward_with_extra_patches(x, strip))
        latent = model(x)
        assert (logits - latent).abs().max().item() < DEPLOY_ATOL * max(1.0, latent.abs().max().item())


def test_forced_token_space_on_a_tall_projection_refuses_to_deploy(shapes):
    backbone, size = shapes("p4-tall")
    model = _pgn(backbone, library_space="token")
    assert not model.exact_inversion
    model.deploy = True
    with pytest.raises(VistuneError, match="library_space=pixel"):
        model(torch.randn(1, 3, size, size))


def test_prompts_are_input_dependent_mixtures_of_the_library(shapes):
    backbone, size = shapes("p32-wide")
    model = _pgn(backbone)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        weights = model.mixture(x)
        prompts = model.prompt_tokens(x)
    assert weights.shape == (2, SMALL["num_prompts"], SMALL["library_size"])
    assert torch.allclose(weights.sum(-1), torch.ones(2, SMALL["num_prompts"]))
    assert torch.allclose(prompts, weights @ model.library, atol=1e-6)
    assert not torch.allclose(prompts[0], prompts[1])


def test_forward_by_hand_prompts_without_positions_after_the_prefix(shapes):
    backbone, size = shapes("p8-wide-cls-reg")  # CLS + 1 register token
    model = _pgn(backbone)
    vit = backbone.model
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        prompts = model.prompt_tokens(x)
        patches = vit.patch_embed(x) + vit.pos_embed[:, vit.num_prefix_tokens:] if vit.no_embed_class else None
        prefix = torch.cat([vit.cls_token, vit.reg_token], 1).expand(2, -1, -1)
        if vit.no_embed_class:
            seq = torch.cat([prefix, prompts, patches], 1)
        else:
            with_pos = torch.cat([prefix, vit.patch_embed(x)], 1) + vit.pos_embed
            seq = torch.cat([with_pos[:, :2], prompts, with_pos[:, 2:]], 1)
        out = vit.norm(vit.blocks(vit.norm_pre(seq)))
        expected = model.head(vit.fc_norm(out[:, 0]))
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_vit_b32_default_count_formula():
    """≈1.0M on ViT-B/32 with the defaults (T=16, M=256, ResNet-10 16/32/64/128), head excluded."""
    backbone = load_backbone("vit_base_patch32_224", random_init=True)
    model = adapt(backbone, make_config("pgn"), 100)
    counts = count_parameters(model)
    generator = sum(p.numel() for p in model.generator.parameters())
    assert generator == 324_576
    assert counts["tuned_params_excluding_head"] == generator + (128 + 1) * 16 * 256 + 256 * 768 == 1_049_568
    assert counts["tuned_params"] == 1_049_568 + 768 * 100 + 100


def test_pixel_library_count_and_timm_generator(shapes):
    backbone, _ = shapes("p4-tall")
    model = adapt(backbone, make_config("pgn", {"generator": "mobilenetv3_small_050", "generator_pretrained": False,
                                                "num_prompts": 4, "library_size": 16}), 3)
    counts = count_parameters(model)
    generator = sum(p.numel() for p in model.generator.parameters())
    features = model.generator.num_features
    assert counts["tuned_params_excluding_head"] == generator + (features + 1) * 4 * 16 + 16 * 3 * 4 * 4


def test_generator_resolution_resizes_only_the_generator_input(shapes):
    backbone, size = shapes("p32-wide")
    model = _pgn(backbone, generator_resolution=32)
    seen = []
    model.generator.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    assert seen == [32]


@pytest.mark.parametrize("sets,match", [({"num_prompts": 0}, "num_prompts"), ({"generator_resolution": 4}, "small"),
                                        ({"library_space": "words"}, "one of")])
def test_bad_options_are_refused(sets, match):
    with pytest.raises(VistuneError, match=match):
        make_config("pgn", {k: str(v) for k, v in sets.items()})


def test_pgn_refuses_cnn_backbones(tiny_backbones):
    with pytest.raises(VistuneError, match="does not support the generic family"):
        adapt(tiny_backbones("resnet"), make_config("pgn"), 3)
