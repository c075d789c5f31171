"""Remapping: weight selection picks exactly the documented elements, growth preserves the function and then
trains, every supported family round-trips through the checkpoint and load_backbone, refusals are
VistuneErrors, and `vistune remap` (through its own parser) writes what `vistune train` loads."""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import ResPostBlock

from conftest import IMAGE_SIZE, TINY, tinted_class_folder, tiny_backbone
from vistune.artifacts import load_artifact
from vistune.backbones import load_backbone
from vistune.errors import VistuneError
from vistune.remapping import (
    element_indices, features, grow, grow_weights, identity_outputs, insertion_plan, layer_indices,
    parse_arch_spec, probe_input, save_remapped, select, select_weights,
)
from vistune.cli.remap import add_parsers as add_parser
from vistune.run import Job, run_job
from vistune.training import TrainConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one torch thread (conftest.one_thread)."""


def distinct(model: torch.nn.Module) -> torch.nn.Module:
    """Every float tensor filled with values no other element has, so a selected element names its source."""
    with torch.no_grad():
        start = 0
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.arange(start, start + t.numel(), dtype=t.dtype).reshape(t.shape))
                start += t.numel()
    return model


# ---- the selection rules -------------------------------------------------------------------------------
def test_index_rules_are_the_documented_ones():
    assert element_indices("uniform", 12, 4) == [0, 3, 6, 9]  # every (T/S)-th, as the official code
    assert element_indices("uniform", 10, 4) == [0, 2, 5, 7]  # ⌊i·T/S⌋ when S does not divide T
    assert element_indices("consecutive", 10, 4) == [0, 1, 2, 3]
    assert layer_indices("first", 12, 4) == [0, 1, 2, 3]
    assert layer_indices("uniform", 12, 4) == [0, 4, 7, 11]  # round(i·11/3), first and last kept
    assert layer_indices("uniform", 6, 3) == [0, 3, 5]  # 2.5 rounds up
    assert layer_indices("uniform", 6, 1) == [0]


# layer scale, qk-norm (over a head's width) and the attention's scale norm (over its channels) included
EXTRAS = dict(init_values=0.5, qk_norm=True, scale_attn_norm=True)
TEACHER = dict(img_size=8, patch_size=4, embed_dim=12, depth=4, num_heads=3, mlp_ratio=2.0, **EXTRAS)  # head 4
STUDENT = dict(img_size=8, patch_size=4, embed_dim=4, depth=2, num_heads=2, mlp_ratio=1.5, **EXTRAS)  # head 2
# rules → (teacher block of each student block, residual channels, attention channels (heads × within a head),
# within a head, MLP hidden units (24 → 6))
EXPECTED = {
    ("uniform", "uniform"): ([0, 3], [0, 3, 6, 9], [0, 2, 4, 6], [0, 2], [0, 4, 8, 12, 16, 20]),  # heads 0, 1
    ("first", "consecutive"): ([0, 1], [0, 1, 2, 3], [0, 1, 4, 5], [0, 1], [0, 1, 2, 3, 4, 5]),  # heads 0, 1
}


@pytest.mark.parametrize("layers,elements", list(EXPECTED))
def test_weight_selection_picks_exactly_the_documented_elements(layers, elements):
    teacher = distinct(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TEACHER))
    student = timm.create_model("vit_tiny_patch16_224", num_classes=0, **STUDENT)
    state = select_weights(teacher, student, layers=layers, elements=elements)
    blocks, d, inner, within, hidden = EXPECTED[(layers, elements)]
    qkv = inner + [12 + c for c in inner] + [24 + c for c in inner]  # the same channels of Q, K and V
    t = teacher.state_dict()
    assert state["cls_token"].equal(t["cls_token"][:, :, d])
    assert state["pos_embed"].equal(t["pos_embed"][:, :, d])  # all 5 tokens kept
    assert state["patch_embed.proj.weight"].equal(t["patch_embed.proj.weight"][d])  # 4x4 kernel, 3 channels kept
    assert state["norm.weight"].equal(t["norm.weight"][d])
    for i, b in enumerate(blocks):
        s, p = f"blocks.{i}.", f"blocks.{b}."
        assert state[s + "norm1.weight"].equal(t[p + "norm1.weight"][d])
        assert state[s + "attn.qkv.weight"].equal(t[p + "attn.qkv.weight"][qkv][:, d])
        assert state[s + "attn.qkv.bias"].equal(t[p + "attn.qkv.bias"][qkv])
        assert state[s + "attn.proj.weight"].equal(t[p + "attn.proj.weight"][d][:, inner])
        assert state[s + "attn.proj.bias"].equal(t[p + "attn.proj.bias"][d])
        assert state[s + "attn.q_norm.weight"].equal(t[p + "attn.q_norm.weight"][within])
        assert state[s + "attn.norm.weight"].equal(t[p + "attn.norm.weight"][inner])
        assert state[s + "ls1.gamma"].equal(t[p + "ls1.gamma"][d])
        assert state[s + "mlp.fc1.weight"].equal(t[p + "mlp.fc1.weight"][hidden][:, d])
        assert state[s + "mlp.fc2.weight"].equal(t[p + "mlp.fc2.weight"][d][:, hidden])
    assert set(state) == set(student.state_dict())


def test_a_selected_head_is_one_teacher_head():
    """Same head width, fewer heads: student head j computes teacher head heads[j]'s attention exactly."""
    plain = {k: v for k, v in TEACHER.items() if k not in EXTRAS}
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**plain, "num_heads": 6})  # head 2
    student = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**plain, "embed_dim": 4, "num_heads": 2})
    student.load_state_dict(select_weights(teacher, student))
    x = torch.randn(1, 5, 4)
    wide = torch.zeros(1, 5, 12)
    wide[..., [0, 3, 6, 9]] = x  # the student's residual channels inside the teacher's
    t_attn, s_attn = teacher.blocks[0].attn, student.blocks[0].attn

    def heads(attn, tokens):  # (heads, tokens, head_dim) before the output projection
        q, k, v = attn.qkv(tokens).reshape(5, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
        return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v

    with torch.no_grad():
        assert torch.allclose(heads(s_attn, x), heads(t_attn, wide)[[0, 3]], atol=1e-6)  # heads ⌊j·6/2⌋


# ---- every family, through the checkpoint -----------------------------------------------------------------
SELECTIONS = {  # source (conftest TINY kind or arch) → target options (over the source's) or another arch
    "vit": ("vit", None, dict(embed_dim=16, depth=1, num_heads=1, mlp_ratio=3.0)),
    "vit_reg_avg": ("vit_reg_avg", None, dict(embed_dim=16, num_heads=1)),
    "deit_distilled": ("deit_distilled", None, dict(depth=1, mlp_ratio=2.0)),
    "convnext": ("convnext", None, dict(dims=[24, 48, 96, 160], depths=[1, 1, 3, 1])),
    "resnet": ("resnet", None, dict(channels=[32, 64, 96, 128], stem_width=16)),
    "mobilenet": ("mobilenet", "mobilenetv2_035", {}),
    "efficientnet-depth": ("tf_efficientnet_lite1", "tf_efficientnet_lite0", {}),
}


def source_backbone(kind: str):
    """A random-weight source whose norms and layer scales are random too: timm's init zeroes ResNets' last BN
    and gives ConvNeXt's layer scale 1e-6, which would make every residual branch (almost) vanish."""
    view = tiny_backbone(kind) if kind in TINY else load_backbone(kind, random_init=True)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, t in view.model.state_dict().items():
            leaf = name.rpartition(".")[2]
            if leaf in ("gamma", "running_var") or (leaf == "weight" and t.dim() == 1):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif leaf in ("bias", "running_mean") and t.dim() == 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    return view


def round_trip(tmp_path, source, model, architecture, options, how) -> None:
    path = tmp_path / "remapped.safetensors"
    save_remapped(path, model, architecture=architecture, options=options, source=source, how=how)
    loaded = load_backbone(architecture, checkpoint=str(path))  # no model options: the file's are used
    assert loaded.spec.model_kwargs == json.loads(json.dumps(options))
    assert list(loaded.model.pretrained_cfg["input_size"]) == list(source.model.pretrained_cfg["input_size"])
    state = loaded.model.state_dict()
    assert all(state[k].equal(v) for k, v in model.state_dict().items())
    x = probe_input(model)
    assert features(loaded.model, x).equal(features(model, x))
    with safe_open(str(path), "pt") as f:
        remap = json.loads(f.metadata()["remap"])
    assert remap["method"] == how["method"] and remap["source"]["fingerprint"] == source.fingerprint()


@pytest.mark.parametrize("case", list(SELECTIONS))
def test_weight_selection_round_trips_on_every_family(case, tmp_path):
    kind, arch, options = SELECTIONS[case]
    source = source_backbone(kind)
    architecture = arch or source.spec.architecture
    options = options if arch else {**source.spec.model_kwargs, **options}
    model = select(source, architecture, options, layers="uniform" if "depth" in case else "first")
    assert sum(p.numel() for p in model.parameters()) < source.num_params()
    round_trip(tmp_path, source, model, architecture, options, {"method": "weight-selection"})


# ---- growth -----------------------------------------------------------------------------------------------
def test_insertion_plan_spreads_new_blocks_after_the_documented_ones():
    assert insertion_plan(6, 9) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True),
                                    (4, False), (5, False), (5, True)]  # after blocks ⌈(j+1)·6/3⌉−1 = 1, 3, 5
    assert insertion_plan(2, 3) == [(0, False), (1, False), (1, True)]  # one new block goes last
    assert insertion_plan(1, 3) == [(0, False), (0, True), (0, True)]


GROWTHS = {  # source → target options over the source's, or another architecture
    "vit-depth": ("vit", None, dict(depth=4)),
    "vit-mlp": ("vit", None, dict(mlp_ratio=6.5)),
    "vit-both": ("vit_reg_avg", None, dict(depth=3, mlp_ratio=9.0)),  # more than twice the hidden units
    "deit": ("deit_distilled", None, dict(depth=3)),
    "convnext": ("convnext", None, dict(depths=[3, 2, 7, 3])),
    "resnet": ("resnet", None, dict(layers=[2, 1, 3, 2])),  # also after strided first blocks: fresh init
    "efficientnet-lite": ("efficientnet", "tf_efficientnet_lite1", {}),  # InvertedResidual copies
    "efficientnet-b": ("efficientnet_b0", "efficientnet_b1", {}),  # new DepthwiseSeparable/IR blocks, fresh
}
_grown: dict = {}


def grown(case: str):
    if case not in _grown:
        kind, arch, options = GROWTHS[case]
        source = source_backbone(kind)
        architecture = arch or source.spec.architecture
        options = options if arch else {**source.spec.model_kwargs, **options}
        _grown[case] = (source, architecture, options, grow(source, architecture, options, seed=1))
    return _grown[case]


@pytest.mark.parametrize("case", list(GROWTHS))
def test_growth_preserves_the_logits(case, tmp_path):
    source, architecture, options, model = grown(case)
    assert sum(p.numel() for p in model.parameters()) > source.num_params()
    head = torch.nn.Linear(source.feature_dim, 5)
    x = probe_input(model, batch=3, seed=7)
    with torch.no_grad():
        assert torch.allclose(head(features(model, x)), head(features(source.model, x)), atol=1e-5, rtol=0)
    round_trip(tmp_path, source, model, architecture, options, {"method": "net2net-growth"})


def features_with_grad(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("case", ["vit-both", "convnext", "resnet", "efficientnet-lite"])
def test_grown_model_trains_and_its_new_blocks_learn(case):
    source, _, _, model = grown(case)
    model = copy.deepcopy(model).eval()  # eval: frozen BatchNorm statistics, as vistune trains backbones
    zeroed = [n for n, p in model.named_parameters() if n.endswith("weight") and not p.any()]
    assert zeroed, "the new blocks' residual outputs start at zero"
    head = torch.nn.Linear(source.feature_dim, 3)
    x = torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-4)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(head(features_with_grad(model, x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]
    params = dict(model.named_parameters())
    assert all(params[n].any() for n in zeroed), "every identity-initialised branch receives gradients"


# ---- refusals ----------------------------------------------------------------------------------------------
VIT_ARCH, VIT_OPTIONS = TINY["vit"]
SELECTION_REFUSALS = {  # target options over the tiny ViT's → words the message must contain
    "wider": (dict(embed_dim=64, num_heads=4), "only narrows"),
    "more heads": (dict(num_heads=4), "4 heads of width 8, the source 2 of width 16"),
    "patch size": (dict(patch_size=4), "token grid"),
    "deeper": (dict(depth=3), "the target has 3 blocks, the source only 2"),
    "registers": (dict(reg_tokens=1), "no counterpart of the target's ['reg_token']"),
    "map pool": (dict(global_pool="map", class_token=False), "attention"),
}


@pytest.mark.parametrize("case", list(SELECTION_REFUSALS))
def test_weight_selection_refuses_what_it_cannot_select(case):
    options, words = SELECTION_REFUSALS[case]
    with pytest.raises(VistuneError) as e:
        select(tiny_backbone("vit"), VIT_ARCH, {**VIT_OPTIONS, **options})
    assert words in e.value.what and e.value.fix


def test_remapping_refuses_other_families_and_other_classes():
    with pytest.raises(VistuneError, match="source swin_tiny_patch4_window7_224 is a SwinTransformer: remapping works"):
        select(tiny_backbone("swin"), *TINY["swin"])
    with pytest.raises(VistuneError, match="VisionTransformerDistilled, the source a VisionTransformer"):
        select(tiny_backbone("vit"), "deit_tiny_distilled_patch16_224", VIT_OPTIONS)
    resnext = timm.create_model("resnet26", num_classes=0, cardinality=4, base_width=32, channels=(8, 16, 32, 64))
    with pytest.raises(VistuneError, match="layer1.0.conv2 of the target is a grouped convolution \\(4 groups\\)"):
        select_weights(resnext, resnext)


GROWTH_REFUSALS = {
    "shallower": (dict(depth=1), "the target has 1 blocks, the source 2"),
    "wider residual": (dict(embed_dim=64), "cls_token is (1, 1, 64) in the target but (1, 1, 32)"),
    "narrower mlp": (dict(mlp_ratio=2.0), "narrower than the source's"),
    "layer scale": (dict(init_values=1e-5), "['ls1.gamma', 'ls2.gamma'] differ"),
}


@pytest.mark.parametrize("case", list(GROWTH_REFUSALS))
def test_growth_refuses_what_is_not_a_deepening_or_widening(case):
    options, words = GROWTH_REFUSALS[case]
    with pytest.raises(VistuneError) as e:
        grow(tiny_backbone("vit"), VIT_ARCH, {**VIT_OPTIONS, **options})
    assert words in e.value.what and "growth" in e.value.fix


def test_growth_refuses_blocks_that_cannot_start_as_the_identity():
    """A post-norm block's branch output is normed, so zeroing its projection does not zero it."""
    def post_norm(depth):
        return timm.create_model(VIT_ARCH, num_classes=0, **{**VIT_OPTIONS, "depth": depth}, block_fn=ResPostBlock)

    with pytest.raises(VistuneError, match="ResPostBlock, which cannot start as the identity"):
        grow_weights(post_norm(2), post_norm(3))
    with pytest.raises(VistuneError, match="cannot start as the identity"):
        identity_outputs(torch.nn.Linear(2, 2), "blocks.3")
    def normed_mlp(ratio):  # a LayerNorm over the hidden units: replicating units would change its statistics
        return timm.create_model(VIT_ARCH, num_classes=0, **{**VIT_OPTIONS, "mlp_ratio": ratio}, scale_mlp_norm=True)

    with pytest.raises(VistuneError, match="widening the MLP is done for timm's ViT Mlp without a hidden norm"):
        grow_weights(normed_mlp(4.0), normed_mlp(8.0))


# ---- ARCH_SPEC ---------------------------------------------------------------------------------------------
def test_arch_spec_syntax():
    spec = parse_arch_spec("convnext_atto:depths=[1,1,3,1],dims=[8,16,32,64],drop_path_rate=0.1,conv_mlp=true")
    assert spec.architecture == "convnext_atto"
    assert spec.options == {"depths": [1, 1, 3, 1], "dims": [8, 16, 32, 64], "drop_path_rate": 0.1,
                            "conv_mlp": True}
    assert parse_arch_spec("mobilenetv2_050").options == {}
    relative = parse_arch_spec("depth=3, global_pool=avg")
    assert relative.architecture is None and relative.options == {"depth": 3, "global_pool": "avg"}
    assert relative.resolve("vit_small_patch16_224", {"depth": 6, "img_size": 32}) == (
        "vit_small_patch16_224", {"depth": 3, "img_size": 32, "global_pool": "avg"})
    named = parse_arch_spec("vit_tiny_patch16_224:depth=3")  # a named architecture takes only its own options
    assert named.resolve("vit_small_patch16_224", {"img_size": 32}) == ("vit_tiny_patch16_224", {"depth": 3})


@pytest.mark.parametrize("text,words", [
    ("", "empty architecture"),
    ("vit_small_patch16_224:depth", "'depth' in 'vit_small_patch16_224:depth' is not KEY=VALUE"),
    ("depth=", "is not KEY=VALUE"),
    ("depth=3x", "value '3x' of 'depth' is not a number"),
    ("depths=[1,2", "unclosed bracket"),
    ("depth=3,depth=4", "option 'depth' given twice"),
    ("2x=3", "'2x' is not an option name"),
])
def test_arch_spec_errors_name_the_offending_part(text, words):
    with pytest.raises(VistuneError) as e:
        parse_arch_spec(text)
    assert words in e.value.what and e.value.fix


# ---- load_backbone and the file's metadata -----------------------------------------------------------------
def test_load_backbone_uses_the_files_options_and_refuses_others(tmp_path):
    source = tiny_backbone("vit")
    options = {**VIT_OPTIONS, "depth": 1}
    path = tmp_path / "small.safetensors"
    save_remapped(path, select(source, VIT_ARCH, options), architecture=VIT_ARCH, options=options, source=source,
                  how={"method": "weight-selection"})
    assert load_backbone(VIT_ARCH, checkpoint=str(path), model_kwargs=options).spec.model_kwargs == options
    with pytest.raises(VistuneError, match="was written for vit_tiny_patch16_224 with options") as e:
        load_backbone(VIT_ARCH, checkpoint=str(path), model_kwargs=VIT_OPTIONS)
    assert "no model options" in e.value.fix
    with pytest.raises(VistuneError, match="holds a timm 'vit_tiny_patch16_224' model, not 'vit_small_patch16_224'"):
        load_backbone("vit_small_patch16_224", checkpoint=str(path))


def test_a_remapped_checkpoint_trains_and_its_artifact_reloads(tmp_path):
    """What `vistune train --backbone ARCH --checkpoint FILE` does: the options come from the file, the
    artifact records them, and load_artifact rebuilds the same logits."""
    source = source_backbone("vit")
    options = {**VIT_OPTIONS, "embed_dim": 16, "num_heads": 1}
    path = tmp_path / "small.safetensors"
    save_remapped(path, select(source, VIT_ARCH, options), architecture=VIT_ARCH, options=options, source=source,
                  how={"method": "weight-selection"})
    folder = tinted_class_folder(tmp_path / "data", 6, 3, seed=4)
    job = Job(backbone=VIT_ARCH, method="linear", data=str(folder), out=str(tmp_path / "run"), checkpoint=str(path),
              image_size=IMAGE_SIZE, train=TrainConfig(epochs=1, batch_size=4, lr=0.5, device="cpu", seed=0))
    trained = run_job(job, progress=False)["model"]
    reloaded, meta = load_artifact(tmp_path / "run")
    assert meta["backbone"]["model_kwargs"] == options
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(trained.eval()(x), reloaded(x))


# ---- the command ---------------------------------------------------------------------------------------------
def remap(*argv) -> int:
    parser = argparse.ArgumentParser(prog="vistune")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["remap", *map(str, argv)])
    return args.func(args)


def saved(kind: str, path) -> str:
    """A tiny source saved the way `vistune export --merged` does: architecture and options in the metadata."""
    arch, options = TINY[kind]
    save_file({k: v.contiguous() for k, v in source_backbone(kind).model.state_dict().items()}, str(path),
              metadata={"architecture": arch, "model_kwargs": json.dumps(options)})
    return str(path)


@pytest.fixture
def teacher_file(tmp_path):
    return saved("vit", tmp_path / "teacher.safetensors")


def test_remap_command_selects_and_grows_into_loadable_checkpoints(teacher_file, tmp_path):
    small, big = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    assert remap("--from", VIT_ARCH, "--checkpoint", teacher_file, "--to", "depth=1,embed_dim=16,num_heads=1",
                 "--layers", "uniform", "--out", small) == 0
    loaded = load_backbone(VIT_ARCH, checkpoint=str(small))
    assert loaded.spec.model_kwargs == {**VIT_OPTIONS, "depth": 1, "embed_dim": 16, "num_heads": 1}
    teacher = load_backbone(VIT_ARCH, checkpoint=str(teacher_file))
    assert loaded.model.blocks[0].norm1.weight.equal(teacher.model.blocks[0].norm1.weight[::2])  # uniform elements
    with safe_open(str(small), "pt") as f:
        assert json.loads(f.metadata()["remap"])["layers"] == "uniform"

    assert remap("--grow", "--from", VIT_ARCH, "--checkpoint", teacher_file, "--depth", "3", "--mlp-ratio", "6",
                 "--out", big) == 0
    grown_view = load_backbone(VIT_ARCH, checkpoint=str(big))
    assert grown_view.spec.model_kwargs == {**VIT_OPTIONS, "depth": 3, "mlp_ratio": 6.0}
    x = probe_input(grown_view.model)
    assert torch.allclose(grown_view(x), teacher(x), atol=1e-5, rtol=0)

    before = big.read_bytes()
    with pytest.raises(VistuneError, match="already exists") as e:
        remap("--grow", "--from", VIT_ARCH, "--checkpoint", teacher_file, "--depth", "4", "--out", big)
    assert "--overwrite" in e.value.fix and big.read_bytes() == before
    assert remap("--grow", "--from", VIT_ARCH, "--checkpoint", teacher_file, "--depth", "4", "--out", big,
                 "--overwrite") == 0
    assert load_backbone(VIT_ARCH, checkpoint=str(big)).spec.model_kwargs["depth"] == 4


@pytest.mark.parametrize("argv,words", [
    (["--to", "depth=1", "--grow", "--layers", "first"], "--layers: weight-selection options, not growth ones"),
    (["--depth", "3"], "--depth only with --grow"),
    ([], "weight selection needs the target model"),
    (["--grow"], "--grow: nothing to grow"),
    (["--grow", "--depth", "3,3"], "a ViT's depth is one number of blocks (now 2)"),
    (["--to", "depth=1", "--out-name", "x.pt"], "remapped checkpoints are .safetensors files"),
])
def test_remap_command_refuses_unclear_requests(argv, words, teacher_file, tmp_path):
    out = ["--out", tmp_path / "x.safetensors"]
    if "--out-name" in argv:
        argv, out = argv[:-2], ["--out", tmp_path / argv[-1]]
    with pytest.raises(VistuneError) as e:
        remap("--from", VIT_ARCH, "--checkpoint", teacher_file, *argv, *out)
    assert words in e.value.what and e.value.fix
    assert not (tmp_path / "x.safetensors").exists()


def test_remap_command_refuses_depth_and_mlp_options_a_family_lacks(tmp_path):
    out = ["--out", tmp_path / "x.safetensors"]
    mobilenet, convnext = (saved(kind, tmp_path / f"{kind}.safetensors") for kind in ("mobilenet", "convnext"))
    with pytest.raises(VistuneError, match="EfficientNet/MobileNet depths from the architecture's name") as e:
        remap("--grow", "--from", "mobilenetv2_050", "--checkpoint", mobilenet, "--depth", "2", *out)
    assert "--to tf_efficientnet_lite1" in e.value.fix
    with pytest.raises(VistuneError, match="this convnext has 4 stages \\(now 2,2,6,2\\)") as e:
        remap("--grow", "--from", "convnext_atto", "--checkpoint", convnext, "--depth", "3", *out)
    assert "--depth 2,2,6,2" in e.value.fix
    with pytest.raises(VistuneError, match="--mlp-ratio: convnext_atto is a convnext"):
        remap("--grow", "--from", "convnext_atto", "--checkpoint", convnext, "--mlp-ratio", "6", *out)
    assert remap("--grow", "--from", "convnext_atto", "--checkpoint", convnext, "--depth", "2,3,6,2", *out) == 0
    assert load_backbone("convnext_atto", checkpoint=str(tmp_path / "x.safetensors")).spec.model_kwargs == {
        "depths": [2, 3, 6, 2]}


# ---- real weights (slow) -------------------------------------------------------------------------------------
OWN_VIT = "vistune/vit-tiny-cifar10"  # D=256, 6 blocks, 4 heads, mlp_ratio 2, patch 4, 32 px
SMALL = dict(depth=3, embed_dim=128, num_heads=2)  # weight selection's target, over the source's options
GROWN = dict(depth=8, mlp_ratio=3.0)  # growth's target: 2 identity blocks (after blocks 2 and 5), 3x MLP


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The own CIFAR-10 ViT, its remapped checkpoints (loaded as `vistune train --checkpoint` would) and
    sklearn digits (160 train / 80 val / 300 test, the own ViT's preprocessing for every model)."""
    from vistune.data import load_data
    from vistune.run import preprocessing_for, transforms_for

    teacher = load_backbone(OWN_VIT)
    arch, base = teacher.spec.architecture, teacher.spec.model_kwargs
    small, grown_options = {**base, **SMALL}, {**base, **GROWN}
    views = {"original": teacher, "random": load_backbone(arch, random_init=True, model_kwargs=small)}
    models = {"selected": select(teacher, arch, small),
              "consecutive elements": select(teacher, arch, small, elements="consecutive"),
              "uniform layers": select(teacher, arch, small, layers="uniform"),
              "grown": grow(teacher, arch, grown_options)}
    folder = tmp_path_factory.mktemp("remapped")
    for name, model in models.items():
        path = folder / f"{name}.safetensors"
        options = grown_options if name == "grown" else small
        save_remapped(path, model, architecture=arch, options=options, source=teacher, how={"method": name})
        views[name] = load_backbone(arch, checkpoint=str(path))
    tr, ev = transforms_for(preprocessing_for(teacher, Job(backbone=OWN_VIT, method="linear", data="digits")))
    data = load_data("digits", train_transform=tr, eval_transform=ev, train_size=160, val_size=80, test_size=300,
                     seed=0)
    return {"views": views, "data": data, "runs": {}}


def accuracy(real, which: str, method: str) -> float:
    """Test top-1 of ``method`` on digits over backbone ``which`` (runs are seeded: each is run once)."""
    if (which, method) not in real["runs"]:
        job = Job(backbone=which, method=method, data="digits", image_size=32,
                  # the recipe docs/methods.md's table was measured with: SGD base lr 0.5, full AdamW 1e-3
                  train=TrainConfig(epochs=5, batch_size=32, lr=1e-3 if method == "full" else 0.5, seed=0,
                                    optimizer="adamw" if method == "full" else "sgd", device="cpu"))
        result = run_job(job, backbone=real["views"][which], data=real["data"], progress=False)
        real["runs"][(which, method)] = result["test_accuracy"]
        print(f"\n{which} {method}: val {result['val_accuracy']:.3f}, test {result['test_accuracy']:.3f}, "
              f"{result['wall_seconds']:.0f} s")
    return real["runs"][(which, method)]


@pytest.mark.slow
@pytest.mark.parametrize("method,floor", [("linear", 0.52), ("lora", 0.58), ("adapter", 0.57)])
def test_weight_selection_beats_random_init_on_real_weights(real, method, floor):
    """A 3-block, D=128, 2-head ViT (0.41M params) selected from the own 6-block D=256 ViT (3.2M; first-N layers,
    uniform elements) against the same ViT from timm's random init, same data, epochs and seed. Measured on
    2026-11-24, 2-core CPU under load, one thread, test top-1 on digits (chance 0.10):
      linear 0.620 vs 0.243 (1-2 s each), lora 0.683 vs 0.263 (8-14 s), adapter 0.667 vs 0.180 (6 s).
    The 6-block source itself: linear 0.450."""
    selected, random = accuracy(real, "selected", method), accuracy(real, "random", method)
    assert selected >= floor
    assert selected >= random + 0.2


@pytest.mark.slow
@pytest.mark.parametrize("other", ["consecutive elements", "uniform layers"])
def test_the_papers_rules_are_the_better_defaults_here(real, other):
    """First-N layers with uniform elements (the paper's) against each alternative, linear probe as above:
    measured 0.620 vs 0.473 (consecutive elements) and 0.343 (uniform layers: blocks 0, 3, 5) on 2026-11-24."""
    assert accuracy(real, "selected", "linear") >= accuracy(real, other, "linear") + 0.08


@pytest.mark.slow
def test_grown_model_has_the_originals_linear_probe(real):
    """8 blocks and a 3x MLP grown from the own ViT compute its features, so a frozen-backbone probe learns the
    same: measured 0.450 and 0.450 (val 0.450 both) on 2026-11-24 (9 s and 15 s, one thread, loaded CPU)."""
    assert abs(accuracy(real, "grown", "linear") - accuracy(real, "original", "linear")) <= 0.01


@pytest.mark.slow
def test_original_own_vit_fine_tunes_on_digits(real):
    """The reference run for the growth test below: full fine-tuning (AdamW, lr 1e-3 × 32/256, 5 epochs);
    measured 0.657 (val 0.575) on 2026-11-24, 52 s on one thread of a loaded 2-core CPU (261 s when it was
    loaded to 13 runnable jobs)."""
    assert accuracy(real, "original", "full") >= 0.57


@pytest.mark.slow
def test_grown_model_fine_tunes_at_least_as_well_as_the_original(real):
    """The grown ViT (5.3M params) after the same full fine-tuning: measured 0.673 (val 0.637) vs the original's
    0.657 (val 0.575) on 2026-11-24, 82 s (293 s at a load of 13). At least as good, allowing 3 of 300 test
    images for floating-point differences between machines."""
    assert accuracy(real, "grown", "full") >= accuracy(real, "original", "full") - 0.01
