"""AdaptFormer, Convpass, Houlsby, Adapter+ and RepAdapter: each forward recomputed by hand on a tiny ViT from the
stock block's own submodules (explicit matrix math for the method's part, none of its modules' code), with non-zero
tuned tensors; the negative controls; RepAdapter's merge; the placements, refusals and train-mode branches."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import IMAGE_SIZE
from vistune.artifacts import save_artifact
from vistune.cli import main
from vistune.errors import VistuneError
from vistune.merge import merge
from vistune.methods import METHODS, adapt, make_config
from vistune.methods.adapter_common import After, Before, Beside, Branch, Call

X = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
FAMILY = ["adaptformer", "convpass", "houlsby", "adapter-plus", "repadapter"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _adapted(backbone, name, **sets):
    """The method with every tuned tensor (head included) moved off its init, in eval mode."""
    torch.manual_seed(0)
    model = adapt(backbone, make_config(name, sets), 3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _logits(model, tokens):
    """Final norm + timm's pooling of the view, then the method's linear head, by hand."""
    return model.backbone.head_features(tokens) @ model.head.weight.T + model.head.bias


def _bottleneck(p, z, act):
    """up(act(down(z))) · channel scale · scale from the parameters of a vistune Bottleneck (eval: no dropout)."""
    y = act(z @ p.down.weight.T + p.down.bias) @ p.up.weight.T + p.up.bias
    return (y if p.channel_scale is None else y * p.channel_scale) * p.scale


def _frozen_logits(model, backbone):
    return backbone.forward_features(X) @ model.head.weight.T + model.head.bias


# ------------------------------------------------------------------------------------------------- AdaptFormer
@pytest.mark.parametrize("source", ["stream", "norm"])
def test_adaptformer_forward_by_hand(tiny_backbones, source):
    """x = x' + MLP(LN2(x')) + s·up(dropout(ReLU(down(·)))), the branch reading x' (code) or LN2(x') (paper)."""
    backbone = tiny_backbones("vit")
    model = _adapted(backbone, "adaptformer", input=source, bottleneck=4)
    t = backbone.embed(X)
    for blk, own in zip(backbone.model.blocks, model.backbone.model.blocks):
        h = t + blk.ls1(blk.attn(blk.norm1(t)))
        z = _bottleneck(own.mlp.branch, h if source == "stream" else blk.norm2(h), F.relu)
        t = h + blk.ls2(blk.mlp(blk.norm2(h)) + z)
    with torch.no_grad():
        assert (model(X) - _logits(model, t)).abs().max() < 1e-5
        # negative control: s = 0 is the frozen model, exactly
        for m in model.modules():
            if isinstance(m, Branch):
                m.scale = 0.0
        assert torch.equal(model(X), _frozen_logits(model, backbone))


def test_adaptformer_default_branch_reads_the_stream_and_starts_at_zero(tiny_backbones):
    backbone = tiny_backbones("vit")
    model = adapt(backbone, make_config("adaptformer"), 3).eval()
    block = model.backbone.model.blocks[0]
    assert isinstance(block.mlp, Beside) and block.mlp.norm is not None and isinstance(block.norm2, torch.nn.Identity)
    b = block.mlp.branch
    assert b.scale == 0.1 and b.down.out_features == 64 and b.dropout.p == 0.1
    assert b.up.weight.abs().sum() == 0 and b.down.weight.abs().sum() > 0  # LoRA init: the identity at step 0
    with torch.no_grad():
        assert torch.equal(model.features(X), backbone.forward_features(X))


# --------------------------------------------------------------------------------------------------- Convpass
def _conv3x3(grid, weight, bias):
    """A zero-padded 3×3 convolution written out as a sum of the nine shifted grids."""
    b, c, h, w = grid.shape
    padded = F.pad(grid, (1, 1, 1, 1))
    out = bias.view(1, -1, 1, 1).expand(b, -1, h, w).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + torch.einsum("oi,bihw->bohw", weight[:, :, dy, dx], padded[:, :, dy:dy + h, dx:dx + w])
    return out


def _convpass(p, tokens, prefix, grid):
    """The bypass by hand: every prefix token a 1×1 image through the same 3×3 conv, the patches on their grid."""
    gelu = lambda v: v * torch.sigmoid(1.702 * v)  # noqa: E731 (QuickGELU)
    z = gelu(tokens @ p.down.weight.T + p.down.bias)
    b = z.shape[0]
    parts = [_conv3x3(z[:, i].reshape(b, -1, 1, 1), p.conv.weight, p.conv.bias).reshape(b, 1, -1)
             for i in range(prefix)]
    patches = z[:, prefix:].transpose(1, 2).reshape(b, -1, *grid)
    parts.append(_conv3x3(patches, p.conv.weight, p.conv.bias).flatten(2).transpose(1, 2))
    return (gelu(torch.cat(parts, 1)) @ p.up.weight.T + p.up.bias) * p.scale


@pytest.mark.parametrize("kind", ["vit", "deit_distilled"])  # 1 prefix token; CLS + distillation token
def test_convpass_forward_by_hand(tiny_backbones, kind):
    backbone = tiny_backbones(kind)
    model = _adapted(backbone, "convpass", scale=0.5, conv_init="xavier")
    n, grid = backbone.num_prefix_tokens, tuple(backbone.model.patch_embed.grid_size)
    t = backbone.embed(X)
    for blk, own in zip(backbone.model.blocks, model.backbone.model.blocks):
        h = blk.norm1(t)
        t = t + blk.ls1(blk.attn(h) + _convpass(own.attn.branch, h, n, grid))
        h = blk.norm2(t)
        t = t + blk.ls2(blk.mlp(h) + _convpass(own.mlp.branch, h, n, grid))
    with torch.no_grad():
        assert (model(X) - _logits(model, t)).abs().max() < 1e-5
        for m in model.modules():  # negative control: zero up-projections give the frozen model back
            if isinstance(m, Branch):
                m.up.weight.zero_()
                m.up.bias.zero_()
        assert torch.equal(model(X), _frozen_logits(model, backbone))


def test_convpass_conv_sees_neighbours_on_the_grid_and_only_the_centre_tap_on_the_cls(tiny_backbones):
    backbone = tiny_backbones("vit")
    model = _adapted(backbone, "convpass", conv_init="xavier")
    bypass = model.backbone.model.blocks[0].attn.branch
    grid = backbone.model.patch_embed.grid_size
    tokens = torch.zeros(1, 1 + grid[0] * grid[1], backbone.embed_dim)
    with torch.no_grad():
        base = bypass(tokens)
        poked = tokens.clone()
        poked[0, 1 + 5] = 1.0  # patch (1, 1) of the 4×4 grid
        changed = ((bypass(poked) - base).abs().sum(-1)[0] > 1e-7).tolist()
    neighbours = {1 + r * grid[1] + c for r in range(3) for c in range(3)}  # rows/cols 0-2 around (1, 1)
    assert {i for i, c in enumerate(changed) if c} == neighbours  # the CLS (0) never sees a patch
    init = adapt(backbone, make_config("convpass"), 3).backbone.model.blocks[0].attn.branch.conv.weight
    assert torch.equal(init[:, :, 1, 1], torch.eye(8)) and init.abs().sum() == 8  # identity at the centre tap


# ---------------------------------------------------------------------------------------------------- Houlsby
def test_houlsby_forward_by_hand(tiny_backbones):
    """y + s·up(GELU(down(y))) on the attention and MLP outputs; the model's own (trained) LayerNorms."""
    backbone = tiny_backbones("vit")
    model = _adapted(backbone, "houlsby", scale=0.7)
    t = backbone.embed(X)
    for blk, own in zip(backbone.model.blocks, model.backbone.model.blocks):
        a = blk.attn(F.layer_norm(t, (t.shape[-1],), own.norm1.weight, own.norm1.bias, own.norm1.eps))
        t = t + blk.ls1(a + _bottleneck(own.attn.branch, a, F.gelu))
        m = blk.mlp(F.layer_norm(t, (t.shape[-1],), own.norm2.weight, own.norm2.bias, own.norm2.eps))
        t = t + blk.ls2(m + _bottleneck(own.mlp.branch, m, F.gelu))
    with torch.no_grad():
        assert (model(X) - _logits(model, t)).abs().max() < 1e-5
        # negative control: the adapters switched off, with the trained norms kept, differ from the model
        off = copy.deepcopy(model)
        for m in off.modules():
            if isinstance(m, Branch):
                m.scale = 0.0
        assert (off(X) - model(X)).abs().max() > 1e-3


def test_houlsby_trains_every_layer_norm_or_none(tiny_backbones):
    backbone = tiny_backbones("vit")
    tuned = {n for n, p in adapt(backbone, make_config("houlsby"), 3).backbone.model.named_parameters()
             if p.requires_grad and "branch" not in n}
    assert tuned == {f"blocks.{i}.{n}.{w}" for i in range(2) for n in ("norm1", "norm2") for w in ("weight", "bias")} \
        | {"norm.weight", "norm.bias"}
    plain = adapt(backbone, make_config("houlsby", {"train_norms": False, "init": "lora"}), 3).eval()
    assert all("branch" in n for n, p in plain.backbone.model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # lora init with frozen norms: the frozen model at step 0
        assert torch.equal(plain.features(X), backbone.forward_features(X))
    near = adapt(backbone, make_config("houlsby"), 3).eval()  # Houlsby's init: near the identity, not at it
    with torch.no_grad():
        diff = (near.features(X) - backbone.forward_features(X)).abs().max()
    assert 0 < diff < 1e-3


def test_houlsby_on_swin_adapts_each_window_token(tiny_backbones):
    model = adapt(tiny_backbones("swin"), make_config("houlsby"), 3)
    blocks = [b for layer in model.backbone.model.layers for b in layer.blocks]
    assert all(isinstance(b.attn, After) and isinstance(b.mlp, After) for b in blocks)


# ----------------------------------------------------------------------------------------------------- Adapter+
def test_adapter_plus_forward_by_hand(tiny_backbones):
    """y = block(x); y + γ ⊙ up(GELU(down(y))) after every block (eval: no drop-path)."""
    backbone = tiny_backbones("vit")
    model = _adapted(backbone, "adapter-plus")
    t = backbone.embed(X)
    for blk, own in zip(backbone.model.blocks, model.backbone.model.blocks):
        h = t + blk.ls1(blk.attn(blk.norm1(t)))
        y = h + blk.ls2(blk.mlp(blk.norm2(h)))
        t = y + _bottleneck(own.branch, y, F.gelu)
    with torch.no_grad():
        assert (model(X) - _logits(model, t)).abs().max() < 1e-5
        for m in model.modules():  # negative control: γ = 0 is the frozen model
            if isinstance(m, Branch):
                m.channel_scale.zero_()
        assert torch.equal(model(X), _frozen_logits(model, backbone))


def test_adapter_plus_defaults_and_cnn_placement(tiny_backbones):
    model = adapt(tiny_backbones("vit"), make_config("adapter-plus"), 3)
    branch = model.backbone.model.blocks[0].branch
    assert torch.equal(branch.channel_scale, torch.ones(32)) and branch.drop_path.drop_prob == 0.1
    assert 0.005 < branch.down.weight.std() < 0.012 and branch.down.weight.abs().max() <= 0.02  # ±2σ, σ = 0.01
    resnet = adapt(tiny_backbones("resnet"), make_config("adapter-plus"), 3)
    layer = resnet.backbone.model.layer1[0]  # NCHW: the branch acts on the channel dimension
    assert isinstance(layer, After) and layer.channel_dim == 1 and layer.branch.channel_scale.numel() == 64


# -------------------------------------------------------------------------------------------------- RepAdapter
def _rep(p, h):
    """h + s · (B_dense (W_A h + b_A) + b_B), B_dense written out block by block."""
    g, d_g, h_g = p.up_weight.shape
    dense = torch.zeros(g * d_g, g * h_g)
    for i in range(g):
        dense[i * d_g:(i + 1) * d_g, i * h_g:(i + 1) * h_g] = p.up_weight[i]
    return h + p.scale * ((h @ p.down.weight.T + p.down.bias) @ dense.T + p.up_bias)


@pytest.mark.parametrize("placement", ["block", "attn"])
def test_repadapter_forward_by_hand(tiny_backbones, placement):
    backbone = tiny_backbones("vit")
    model = _adapted(backbone, "repadapter", scale=0.5, bottleneck=4, groups=2, placement=placement)
    t = backbone.embed(X)
    for blk, own in zip(backbone.model.blocks, model.backbone.model.blocks):
        t = t + blk.ls1(blk.attn(_rep(own.attn.branch, blk.norm1(t))))
        h = blk.norm2(t)
        t = t + blk.ls2(blk.mlp(_rep(own.mlp.branch, h) if placement == "block" else h))
    with torch.no_grad():
        assert (model(X) - _logits(model, t)).abs().max() < 1e-5
        for m in model.modules():  # negative control: B = 0 (its init) is the frozen model
            if isinstance(m, Branch):
                m.up_weight.zero_()
                m.up_bias.zero_()
        assert torch.equal(model(X), _frozen_logits(model, backbone))


@pytest.mark.parametrize("kind,sets", [("vit", {}), ("swin", {}), ("vit_reg_avg", {"groups": 4, "bias": False})])
def test_repadapter_merges_into_a_stock_timm_model_with_the_same_logits(tiny_backbones, kind, sets):
    backbone = tiny_backbones(kind)
    model = _adapted(backbone, "repadapter", **sets)
    with torch.no_grad():
        adapted = model(X)
        merged = merge(model)
        assert (merged(X) - adapted).abs().max() < 1e-5
        assert torch.equal(model(X), adapted)  # merging worked on a copy
        assert (merged(X) - _frozen_logits(model, backbone)).abs().max() > 1e-3  # and it merged something
    stock = copy.deepcopy(backbone.model)
    stock.reset_classifier(3)
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in stock.named_modules()]
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}


def test_repadapter_folds_into_qkv_and_fc1_and_export_writes_them(tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    model = _adapted(backbone, "repadapter")
    block = model.backbone.model.blocks[0]
    assert isinstance(block.attn, Before) and block.attn.linears == ["qkv"] and block.mlp.linears == ["fc1"]
    save_artifact(model, tmp_path / "art", class_names=["a", "b", "c"], preprocessing={})
    assert main(["export", "--adapter", str(tmp_path / "art"), "--merged", str(tmp_path / "m.safetensors")]) == 0
    from safetensors.torch import load_file

    state = load_file(tmp_path / "m.safetensors")
    untouched = backbone.model.state_dict()
    changed = {k for k in untouched if not torch.equal(state[k], untouched[k])}
    assert changed == {f"blocks.{i}.{m}.{w}" for i in range(2) for m in ("attn.qkv", "mlp.fc1")
                       for w in ("weight", "bias")}


def test_repadapter_refuses_linears_without_bias(tiny_backbones):
    from vistune.backbones import load_backbone

    no_bias = load_backbone("vit_tiny_patch16_224", random_init=True,
                            model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                              qkv_bias=False))
    with pytest.raises(VistuneError, match=r"(?s)Linear qkv of the attn of block 0 .* has no bias.*bias=false"):
        adapt(no_bias, make_config("repadapter"), 3)
    merge(adapt(no_bias, make_config("repadapter", {"bias": False}), 3))


def test_repadapter_refuses_a_sub_layer_that_uses_its_input_beyond_its_linears(tiny_backbones):
    class Sub(torch.nn.Module):
        def __init__(self, skip: bool):
            super().__init__()
            self.fc, self.skip = torch.nn.Linear(32, 32), skip

        def forward(self, x):
            return self.fc(x) + x if self.skip else self.fc(x)

    model = adapt(tiny_backbones("vit"), make_config("repadapter"), 3)
    call = Call(input=torch.zeros(1, 5, 32))
    model._check_foldable("toy", Sub(skip=False), ["fc"], call, verify=True)  # folds: passes
    with pytest.raises(VistuneError, match="uses its input beyond the Linears fc"):
        model._check_foldable("toy", Sub(skip=True), ["fc"], call, verify=True)


# ---------------------------------------------------------------------------------------------- the whole family
@pytest.mark.parametrize("name", FAMILY)
def test_branches_train_while_the_frozen_modules_stay_in_eval(tiny_backbones, name):
    model = adapt(tiny_backbones("vit"), make_config(name), 3).train()
    branches = [m for m in model.backbone.model.modules() if isinstance(m, Branch)]
    assert branches and all(b.training for b in branches)
    inside = {id(m) for b in branches for m in b.modules()}
    assert not any(m.training for m in model.backbone.model.modules() if id(m) not in inside and
                   not isinstance(m, Branch))


@pytest.mark.parametrize("name", ["adaptformer", "convpass", "houlsby", "repadapter"])
def test_transformer_only_methods_refuse_a_cnn_through_their_needs(tiny_backbones, name):
    assert not METHODS[name].supports(tiny_backbones("efficientnet"))
    with pytest.raises(VistuneError, match=f"method '{name}' does not support the generic family"):
        adapt(tiny_backbones("efficientnet"), make_config(name), 3)


def test_convpass_needs_the_token_grid_and_adaptformer_a_pre_norm_mlp(tiny_backbones):
    assert "swin" not in METHODS["convpass"].families and "vit" in METHODS["convpass"].families
    assert {"vit", "eva", "beit", "swin", "swinv2"} <= set(METHODS["adaptformer"].families)
    from vistune.backbones import load_backbone

    v2 = load_backbone("swinv2_tiny_window8_256", random_init=True,
                       model_kwargs=dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1,),
                                         num_heads=(1,)))
    with pytest.raises(VistuneError, match="does not read norm2's output"):
        adapt(v2, make_config("adaptformer"), 3)


@pytest.mark.parametrize("name", FAMILY)
def test_segmentation_decoder_over_the_adapted_backbone(tiny_backbones, name):
    model = adapt(tiny_backbones("vit"), make_config(name), 3, task="segmentation").eval()
    with torch.no_grad():
        assert model(X).shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
