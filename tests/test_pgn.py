"""PGN: the official ResNet-10 generator, prompt generation, placement, exact counts, prompt inversion (pixel
deployment), hybrid ViTs (latent only), and vistune 0.1.0 artifacts (timm-built generator).

Deployment tolerance, fp32: max |logit difference| between the latent-token forward and the input-only
pixel forward < 1e-4 · max(1, max |logit|), on every ViT shape here (square, wide and tall patch
projections). Relative, because the float32 patch projection of an inverted prompt loses about
cond(W) · 6e-8 of the token's scale (a square random 588×588 projection has cond(W) in the hundreds);
the logits after one large SGD step reach ±15 here."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vistune.artifacts import META, load_artifact, meta_checksum, save_artifact
from vistune.backbones import load_backbone
from vistune.errors import VistuneError
from vistune.methods import adapt, count_parameters, make_config
from vistune.methods.pgn import ResNet10, patch_projection, resnet10_timm

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


def _resnet10_params(w: int) -> int:
    """PGN's ResNet-10 at width w, by hand: stem 3×3 conv + BN; stage 1: two 3×3 convs + BNs, identity
    shortcut; stages 2-4 (c → 2c): two 3×3 convs + BNs and a 1×1 shortcut conv with bias. = 1194·w² + 103·w."""
    stem = 3 * w * 9 + 2 * w
    stage1 = 2 * (w * w * 9 + 2 * w)
    stages = sum(c * 2 * c * 9 + 2 * 2 * c + 2 * c * 2 * c * 9 + 2 * 2 * c + c * 2 * c + 2 * c for c in (w, 2 * w, 4 * w))
    return stem + stage1 + stages


def test_generator_is_the_official_resnet10():
    """jochemloedeman/PGN pgn/pgn_models/resnet.py with its scripts' defaults (--init_max_pool True, 16 channels)."""
    g = ResNet10(16)
    assert sum(p.numel() for p in g.parameters()) == _resnet10_params(16) == 307_312
    conv, bn, act, pool = g.stem
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias) == (
        3, 16, (3, 3), (2, 2), (1, 1), None)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert len(g.stages) == 4 and g.num_features == 128
    for i, (block, width) in enumerate(zip(g.stages, (16, 32, 64, 128))):
        assert (block.conv1.out_channels, block.conv2.out_channels, block.conv1.stride) == (width, width,
                                                                                            (1, 1) if i == 0 else (2, 2))
        if i == 0:
            assert block.downsample is None  # identity shortcut
        else:  # a strided 1×1 conv with a bias, no norm
            down = block.downsample
            assert isinstance(down, nn.Conv2d) and down.kernel_size == (1, 1) and down.stride == (2, 2)
            assert (down.in_channels, down.out_channels) == (width // 2, width) and down.bias is not None
    # init: BN weight 1 / bias 0, convs kaiming-normal fan-out (std sqrt(2 / (out · k²)))
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
               for m in g.modules() if isinstance(m, nn.BatchNorm2d))
    big = g.stages[3].conv2.weight
    assert big.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert _resnet10_params(8) == 77_240 == sum(p.numel() for p in ResNet10(8).parameters())  # generator_width


def test_generator_forward_by_hand():
    torch.manual_seed(0)
    g = ResNet10(8)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    g.eval()
    x = torch.randn(2, 3, 64, 64)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    with torch.no_grad():
        h = F.max_pool2d(F.relu(bn(g.stem.bn, F.conv2d(x, g.stem.conv.weight, stride=2, padding=1))), 3, 2, 1)
        for i, b in enumerate(g.stages):
            s = 1 if i == 0 else 2
            z = bn(b.bn2, F.conv2d(F.relu(bn(b.bn1, F.conv2d(h, b.conv1.weight, stride=s, padding=1))),
                                   b.conv2.weight, padding=1))
            short = h if i == 0 else F.conv2d(h, b.downsample.weight, b.downsample.bias, stride=2)
            h = F.relu(z + short)
        expected = h.mean((2, 3))
        got = g(x)
    assert got.shape == (2, 64)
    assert torch.allclose(got, expected, atol=1e-5)


def test_vit_b32_default_count_formula():
    """≈1.0M on ViT-B/32 with the defaults (T=16, M=256, ResNet-10 16/32/64/128), head excluded."""
    backbone = load_backbone("vit_base_patch32_224", random_init=True)
    model = adapt(backbone, make_config("pgn"), 100)
    counts = count_parameters(model)
    generator = sum(p.numel() for p in model.generator.parameters())
    assert isinstance(model.generator, ResNet10) and generator == 307_312
    assert counts["tuned_params_excluding_head"] == generator + (128 + 1) * 16 * 256 + 256 * 768 == 1_032_304
    assert counts["tuned_params"] == 1_032_304 + 768 * 100 + 100


def test_resnet10_timm_is_vistune_010s_generator():
    """The timm-built ResNet of vistune 0.1.0: a 7×7 64-channel stem whatever the width, BN after each shortcut."""
    g = resnet10_timm(16)
    assert sum(p.numel() for p in g.parameters()) == 324_576
    assert g.conv1.kernel_size == (7, 7) and g.conv1.out_channels == 64
    assert isinstance(g.layer1[0].downsample[1], nn.BatchNorm2d)  # 64 → 16
    model = adapt(load_backbone("vit_base_patch32_224", random_init=True,
                                model_kwargs=dict(img_size=64, embed_dim=192, depth=1, num_heads=3)),
                  make_config("pgn", {"generator": "resnet10-timm"}), 3)
    assert type(model.generator).__name__ == "ResNet" and model.generator.num_features == 128


@pytest.mark.parametrize("format_version", [1, 2])
def test_an_artifact_of_010_keeps_its_generator_and_logits(shapes, tmp_path, format_version):
    """vistune 0.1.0 stored ``generator: resnet10`` for the timm-built network: such an artifact (format 1 as
    0.1.0 wrote it, or format 2 from before this change) is recognised by its tensors and rebuilt with
    ``resnet10-timm``, giving the same logits; a new ``resnet10`` artifact stays the official network."""
    backbone, size = shapes("p32-wide")
    old = _pgn(backbone, generator="resnet10-timm")
    save_artifact(old, tmp_path, class_names=list("abcde"), preprocessing={})
    meta = json.loads((tmp_path / META).read_text())
    meta["config"]["generator"] = "resnet10"  # what 0.1.0 wrote for this network
    del meta["meta_sha256"]
    if format_version == 1:
        meta["format_version"] = 1
    else:
        meta["meta_sha256"] = meta_checksum(meta)
    (tmp_path / META).write_text(json.dumps(meta))
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, _ = load_artifact(tmp_path, backbone=backbone)
    assert sum("artifact format 1" in str(w.message) for w in caught) == (format_version == 1)
    assert loaded.config.generator == "resnet10-timm"
    with torch.no_grad():
        assert torch.equal(loaded(x), old(x))

    new = _pgn(backbone)
    save_artifact(new, tmp_path / "new", class_names=list("abcde"), preprocessing={})
    reloaded, _ = load_artifact(tmp_path / "new", backbone=backbone)
    assert reloaded.config.generator == "resnet10" and isinstance(reloaded.generator, ResNet10)
    with torch.no_grad():
        assert torch.equal(reloaded(x), new(x))


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


# a hybrid ViT: timm's HybridEmbed (a ResNetV2 stem, then an 8×8 projection), tiny and random
HYBRID = ("vit_tiny_r_s16_p8_224", dict(img_size=32, embed_dim=32, depth=1, num_heads=2))


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return load_backbone(HYBRID[0], random_init=True, model_kwargs=HYBRID[1])


def test_hybrid_vit_trains_latent_prompts_by_hand(hybrid):
    """The CNN stem makes the patch embedding non-linear in the pixels: PGN runs in latent mode with a token
    library; the prompts enter after the CLS token of the stock HybridEmbed's output, without positions."""
    assert type(hybrid.model.patch_embed).__name__ == "HybridEmbed"
    model = _pgn(hybrid)
    assert model.library_space == "token" and not model.exact_inversion
    assert model.library.shape == (SMALL["library_size"], 32)
    vit = hybrid.model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        prompts = model.prompt_tokens(x)
        with_pos = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(x)], 1) + vit.pos_embed
        seq = torch.cat([with_pos[:, :1], prompts, with_pos[:, 1:]], 1)
        out = vit.norm(vit.blocks(vit.norm_pre(seq)))
        expected = model.head(vit.fc_norm(out[:, 0]))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_hybrid_vit_refuses_pixels_and_deploy(hybrid):
    with pytest.raises(VistuneError, match=r"vit_tiny_r_s16_p8_224.*HybridEmbed.*library_space=pixel .* impossible"):
        adapt(hybrid, make_config("pgn", {**SMALL, "library_space": "pixel"}), 5)
    model = _pgn(hybrid)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(VistuneError, match="cannot be inverted to pixels"):
        model.prompt_pixels(x)
    model.deploy = True
    with pytest.raises(VistuneError, match=r"'vit_tiny_r_s16_p8_224' is not a linear projection of pixel patches "
                                           r"\(it is a HybridEmbed.*deploy mode is impossible") as e:
        model(x)
    assert "no --deploy" in e.value.fix
