"""SCT: registration, exact counts, bit-identical block wrapper, placement and calibration by hand,
artifacts with indices, the `vistune calibrate` command, and (slow) learning on real weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from conftest import IMAGE_SIZE
from vistune.artifacts import load_artifact, save_artifact
from vistune.backbones import load_backbone
from vistune.errors import VistuneError
from vistune.methods import METHODS, adapt, count_parameters, make_config
from vistune.methods.sct import SCT, SCTBlock, SCTStage, SalientChannels, calibrate

X = torch.randn(10, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 2, 3, 0, 3, 3, 2, 0, 0, 3])  # class 1 is absent: it must be skipped
DATA = TensorDataset(X, Y)
TRANSFORMERS = ["vit", "vit_reg_avg", "deit_distilled", "swin"]
PLACEMENTS = ["attn", "mlp-branch", "mlp"]
ALL_KINDS = TRANSFORMERS + ["efficientnet", "resnet", "convnext", "mobilenet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _sct(backbone, num_classes=4, **sets) -> SCT:
    torch.manual_seed(0)
    return adapt(backbone, make_config("sct", sets), num_classes).eval()


def _randomise(model: SCT, seed=1, scale=0.2) -> None:
    """Non-zero SCT weights and non-trivial channel indices, to make placement errors visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.sct:
            m.linear.weight.copy_(torch.randn(m.k, m.k, generator=g) * scale)
            m.linear.bias.copy_(torch.randn(m.k, generator=g) * scale)
            idx = torch.randperm(m.dim, generator=g)[: m.k]
            m.set_channels(idx, torch.rand(m.k, generator=g))


def _tune_by_hand(x: torch.Tensor, m: SalientChannels, channel_dim: int = -1) -> torch.Tensor:
    """x[..., idx] += x[..., idx] @ W.T + b, written plainly (clone + in-place on the copy)."""
    x = x.movedim(channel_dim, -1)
    out = x.clone()
    sel = x[..., m.index]
    out[..., m.index] = sel + sel @ m.linear.weight.T + m.linear.bias
    return out.movedim(-1, channel_dim)


# ------------------------------------------------------------------------------- registry, config, counts
def test_registered_as_parameter_method_for_every_family():
    info = METHODS["sct"]
    assert info.category == "parameter" and info.families == ("any",) and info.description
    fields = info.config_class.fields_help()
    assert fields["top_k"][1] is None and fields["ratio"][1] == 1 / 8 and fields["placement"][1] == "attn"
    assert all(text for _, _, text in fields.values())
    assert make_config("sct", {"top_k": "96", "placement": "mlp"}).top_k == 96
    assert make_config("sct", {"placement": "mlp-branch"}).placement == "mlp-branch"
    with pytest.raises(VistuneError, match="not one of"):
        make_config("sct", {"placement": "ffn"})
    with pytest.raises(VistuneError, match="ratio"):
        make_config("sct", {"ratio": "0"})
    with pytest.raises(VistuneError, match="top_k"):
        make_config("sct", {"top_k": "0"})


@pytest.mark.parametrize("sets", [{"top_k": 96}, {}])  # default ratio 1/8 of 768 is also K = 96
def test_vit_b16_count_is_111744(vit_b16, sets):
    model = adapt(vit_b16, make_config("sct", sets), 100)
    counts = count_parameters(model)
    assert counts["tuned_params_excluding_head"] == 12 * (96**2 + 96) == 111_744
    assert counts["tuned_params"] == 111_744 + 768 * 100 + 100
    assert [m.k for m in model.sct] == [96] * 12
    # tuned tensors: the 12 Linear(96, 96) and the head; the index/score buffers are saved too
    assert {n for n, p in model.named_parameters() if p.requires_grad} == (
        {f"sct.{i}.linear.{w}" for i in range(12) for w in ("weight", "bias")} | {"head.weight", "head.bias"})
    saved = model.tuned_state_dict()
    assert saved["sct.11.index"].shape == (96,) and saved["sct.11.score"].shape == (96,)


def test_swin_and_cnn_counts_per_stage_width(tiny_backbones):
    swin = _sct(tiny_backbones("swin"))  # stage widths 16, 32, one block each → K = 2, 4
    assert [(m.dim, m.k) for m in swin.sct] == [(16, 2), (32, 4)]
    assert count_parameters(swin)["tuned_params_excluding_head"] == (2 * 2 + 2) + (4 * 4 + 4)
    resnet = _sct(tiny_backbones("resnet"))  # resnet10t stages: 64, 128, 256, 512 channels
    assert [(m.dim, m.k) for m in resnet.sct] == [(64, 8), (128, 16), (256, 32), (512, 64)]
    assert count_parameters(resnet)["tuned_params_excluding_head"] == sum(k * k + k for k in (8, 16, 32, 64))
    assert [m.k for m in _sct(tiny_backbones("resnet"), top_k=3).sct] == [3, 3, 3, 3]
    with pytest.raises(VistuneError, match="top_k=40 exceeds the 32 channels"):
        _sct(tiny_backbones("vit"), top_k=40)


def test_init_and_default_channels_before_calibration(tiny_backbones):
    model = _sct(tiny_backbones("vit"))
    for m in model.sct:
        assert torch.equal(m.index, torch.arange(m.k)) and torch.equal(m.score, torch.zeros(m.k))
        assert torch.equal(m.linear.bias, torch.zeros(m.k)) and 0 < m.linear.weight.abs().max() < 0.1  # std 0.02
    assert not model.calibrated
    assert model(X[:2]).shape == (2, 4)  # works without calibration


# ----------------------------------------------------------------------------- wrapper and placement
@pytest.mark.parametrize("kind", TRANSFORMERS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_wrapped_block_is_bit_identical_to_stock_block(tiny_backbones, kind, placement):
    backbone = tiny_backbones(kind)
    v = backbone.model
    with torch.no_grad():
        x = backbone.embed(X[:4]) if kind != "swin" else v.patch_embed(X[:4])
        for block in backbone.blocks():
            if kind == "swin" and block is v.layers[1].blocks[0]:
                x = v.layers[1].downsample(x)
            zero = SalientChannels(x.shape[-1], 2)
            torch.nn.init.zeros_(zero.linear.weight)
            expected = block(x)
            assert torch.equal(SCTBlock(block, None, placement)(x), expected)
            assert torch.equal(SCTBlock(block, zero, placement)(x), expected)
            x = expected


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_zero_weights_give_the_frozen_backbone(tiny_backbones, kind):
    backbone = tiny_backbones(kind)
    model = _sct(backbone)
    _randomise(model)
    with torch.no_grad():
        for m in model.sct:
            m.linear.weight.zero_()
            m.linear.bias.zero_()
        assert torch.equal(model.features(X[:3]), backbone.forward_features(X[:3]))
        model.sct[0].linear.bias.fill_(1.0)  # …and the modules really are in the forward path
        assert not torch.allclose(model.features(X[:3]), backbone.forward_features(X[:3]))


@pytest.mark.parametrize("kind", ["vit", "vit_reg_avg", "deit_distilled"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_vit_placement_by_hand(tiny_backbones, kind, placement):
    backbone = tiny_backbones(kind)
    model = _sct(backbone, placement=placement)
    _randomise(model)
    with torch.no_grad():
        x = backbone.embed(X[:3])
        for block, m in zip(backbone.blocks(), model.sct):  # the caller's stock blocks
            h = x + block.ls1(block.attn(block.norm1(x)))
            if placement == "attn":  # official sct_attn: on the attention residual's sum
                h = _tune_by_hand(h, m)
            branch = block.mlp(block.norm2(h))
            if placement == "mlp-branch":  # official sct_mlp: on the MLP's output, inside its residual
                branch = _tune_by_hand(branch, m)
            x = h + block.ls2(branch)
            if placement == "mlp":  # vistune 0.1.0: on the block's output
                x = _tune_by_hand(x, m)
        expected = backbone.head_features(x)
        assert torch.allclose(model.features(X[:3]), expected, atol=1e-5)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_swin_placement_by_hand(tiny_backbones, placement):
    backbone = tiny_backbones("swin")
    model = _sct(backbone, placement=placement)
    _randomise(model)
    v = backbone.model
    with torch.no_grad():
        x = v.patch_embed(X[:3])
        for stage, m in zip(v.layers, model.sct):
            x = stage.downsample(x)
            block = stage.blocks[0]
            B, H, W, C = x.shape
            h = (x + block._attn(block.norm1(x))).reshape(B, -1, C)
            if placement == "attn":
                h = _tune_by_hand(h, m)
            branch = block.mlp(block.norm2(h))
            if placement == "mlp-branch":
                branch = _tune_by_hand(branch, m)
            x = (h + branch).reshape(B, H, W, C)
            if placement == "mlp":
                x = _tune_by_hand(x, m)
        expected = v.forward_head(v.norm(x), pre_logits=True)
        assert torch.allclose(model.features(X[:3]), expected, atol=1e-5)


def test_mlp_branch_sits_before_layerscale(tiny_backbones):
    """Official sct_mlp: x + ls2(SCT(mlp(norm2(x)))), on a ViT with LayerScale (random per-channel gammas), where
    the module before ls2, after ls2 and after the residual give three different functions."""
    backbone = load_backbone("vit_tiny_patch16_224", random_init=True,
                             model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               init_values=0.5))
    with torch.no_grad():
        for block in backbone.blocks():
            block.ls2.gamma.uniform_(0.2, 2.0)
    models = {p: _sct(backbone, placement=p) for p in PLACEMENTS}
    for model in models.values():
        _randomise(model)
    with torch.no_grad():
        x = backbone.embed(X[:3])
        for block, m in zip(backbone.blocks(), models["mlp-branch"].sct):
            h = x + block.ls1.gamma * block.attn(block.norm1(x))
            x = h + block.ls2.gamma * _tune_by_hand(block.mlp(block.norm2(h)), m)
        expected = backbone.head_features(x)
        got = {p: model.features(X[:3]) for p, model in models.items()}
    assert torch.allclose(got["mlp-branch"], expected, atol=1e-5)
    assert not torch.allclose(got["mlp-branch"], got["mlp"], atol=1e-3)
    assert not torch.allclose(got["mlp-branch"], got["attn"], atol=1e-3)


def test_cnn_stage_module_by_hand(tiny_backbones):
    backbone = tiny_backbones("resnet")
    model = _sct(backbone)
    _randomise(model)
    r = backbone.model
    wrapped = [model.backbone.model.layer1, model.backbone.model.layer4]
    assert all(isinstance(w, SCTStage) for w in wrapped)
    with torch.no_grad():
        x = r.maxpool(r.act1(r.bn1(r.conv1(X[:3]))))
        for stage, m in zip([r.layer1, r.layer2, r.layer3, r.layer4], model.sct):
            x = stage(x)
            # x[:, idx] += Conv1x1(K→K)(x[:, idx]) with the module's weights
            conv = torch.nn.functional.conv2d(x[:, m.index], m.linear.weight[:, :, None, None], m.linear.bias)
            x = x.clone()
            x[:, m.index] += conv
        expected = r.forward_head(x, pre_logits=True)
        assert torch.allclose(model.features(X[:3]), expected, atol=1e-4)


def test_other_block_types_get_sct_at_each_block_output():
    """A ViT whose blocks are not timm's stock Block (here ResPostBlock): SCT cannot sit between the residuals,
    so it takes the generic view's reading — an SCT module on the output of every block — and leaves the
    caller's backbone unwrapped."""
    from timm.models.vision_transformer import ResPostBlock

    from vistune.methods.sct import SCTStage

    backbone = load_backbone("vit_tiny_patch16_224", random_init=True,
                             model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               block_fn=ResPostBlock))
    model = adapt(backbone, make_config("sct"), 3)
    assert [type(b) for b in model.backbone.model.blocks] == [SCTStage, SCTStage]
    assert all(type(b) is ResPostBlock for b in backbone.model.blocks)
    assert model(X[:2]).shape == (2, 3)


# ------------------------------------------------------------------------------------ calibration
def _scores_by_hand(streams: torch.Tensor, labels: torch.Tensor, channel_dim: int) -> np.ndarray:
    """Per class: L2 norm over samples × tokens of each channel; then the mean over present classes."""
    a = streams.movedim(channel_dim, -1).double().numpy()
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    lab = labels.numpy()
    per_class = [np.linalg.norm(a[lab == c].reshape(-1, a.shape[-1]), axis=0) for c in np.unique(lab)]
    return np.mean(per_class, axis=0)


def _check(layers, streams_per_layer, k):
    assert len(layers) == len(streams_per_layer)
    for layer, (streams, cd) in zip(layers, streams_per_layer):
        expected = _scores_by_hand(streams, Y, cd)
        assert np.allclose(layer.all_scores.numpy(), expected, rtol=1e-5)
        top = np.sort(np.argsort(-expected)[:k])
        assert layer.indices.tolist() == top.tolist()
        assert np.allclose(layer.scores.numpy(), expected[top], rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "vit_reg_avg", "deit_distilled"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_vit_calibration_by_hand(tiny_backbones, kind, placement):
    backbone = tiny_backbones(kind)
    n_prefix = backbone.num_prefix_tokens
    streams = []
    with torch.no_grad():
        x = backbone.embed(X)
        for block in backbone.blocks():
            h = x + block.ls1(block.attn(block.norm1(x)))
            x = block(x)
            # official getSalientChannels: norm2's input for sct_attn, the block's output for sct_mlp
            streams.append(((h if placement == "attn" else x)[:, n_prefix:], -1))
    result = calibrate(backbone, DATA, placement=placement, top_k=5, batch_size=4)  # 3 batches accumulate
    assert result.num_images == 10 and result.class_counts == {0: 4, 2: 2, 3: 4}
    _check(result.layers, streams, 5)
    # an SCT model calibrates on its frozen backbone (its own modules switched off) and stores the result
    model = _sct(backbone, top_k=5, placement=placement)
    _randomise(model)
    model.prepare(DATA, device=torch.device("cpu"), batch_size=3, progress=False)
    assert model.calibrated
    for m, layer in zip(model.sct, result.layers):
        assert torch.equal(m.index, layer.indices) and torch.allclose(m.score, layer.scores)
    assert all(w.enabled for w in model.backbone.model.modules() if isinstance(w, SCTBlock))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_swin_calibration_by_hand(tiny_backbones, placement):
    backbone = tiny_backbones("swin")
    v = backbone.model
    streams = []
    with torch.no_grad():
        x = v.patch_embed(X)
        for stage in v.layers:
            x = stage.downsample(x)
            block = stage.blocks[0]
            h = x + block._attn(block.norm1(x))  # input of norm2 (NHWC here)
            x = block(x)
            streams.append((h if placement == "attn" else x, -1))
    result = calibrate(backbone, DATA, placement=placement, batch_size=4)
    assert result.placement == placement
    assert [len(layer.indices) for layer in result.layers] == [2, 4]
    for layer, (s, cd), k in zip(result.layers, streams, (2, 4)):
        _check([layer], [(s, cd)], k)


def test_cnn_calibration_by_hand(tiny_backbones):
    backbone = tiny_backbones("resnet")
    r = backbone.model
    streams = []
    with torch.no_grad():
        x = r.maxpool(r.act1(r.bn1(r.conv1(X))))
        for stage in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = stage(x)
            streams.append((x, 1))  # channels over samples × spatial positions
    result = calibrate(backbone, DATA, top_k=6, batch_size=4)
    _check(result.layers, streams, 6)
    model = _sct(backbone, top_k=6)
    model.prepare(DATA, device=torch.device("cpu"), batch_size=64, progress=False)
    assert [m.index.tolist() for m in model.sct] == [layer.indices.tolist() for layer in result.layers]


# ------------------------------------------------------------------------- training, artifacts, CLI
@pytest.mark.parametrize("kind", ["vit", "swin", "mobilenet"])
def test_step_keeps_backbone_and_artifact_keeps_indices(tiny_backbones, kind, tmp_path):
    backbone = tiny_backbones(kind)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    model = _sct(backbone)
    model.prepare(DATA, device=torch.device("cpu"), batch_size=8, progress=False)
    calibrated = [m.index.clone() for m in model.sct]
    assert any(not torch.equal(i, torch.arange(len(i))) for i in calibrated)
    frozen = {k: v.clone() for k, v in model.frozen_state().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    weights = [m.linear.weight.clone() for m in model.sct]
    model.train()
    loss = torch.nn.functional.cross_entropy(model(X[:4]), Y[:4])
    loss.backward()
    assert all(m.linear.weight.grad.abs().sum() > 0 for m in model.sct)
    opt.step()
    assert all(not torch.equal(w, m.linear.weight) for w, m in zip(weights, model.sct))
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    assert all(torch.equal(frozen[k], v) for k, v in model.frozen_state().items())

    save_artifact(model, tmp_path, class_names=list("abcd"), preprocessing={})
    stored = load_file(str(tmp_path / "adapter.safetensors"))
    assert torch.equal(stored["sct.0.index"], calibrated[0]) and "sct.0.linear.weight" in stored
    assert set(stored) == {k for k in model.tuned_state_dict()}
    model.eval()
    reloaded, meta = load_artifact(tmp_path, backbone=backbone)
    assert meta["method"] == "sct" and reloaded.calibrated
    assert all(torch.equal(a.index, b.index) and torch.equal(a.score, b.score) for a, b in zip(model.sct, reloaded.sct))
    with torch.no_grad():
        assert torch.equal(model(X[:4]), reloaded(X[:4]))


def _image_folder(root, per_class=4):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(["cat", "dog", "fox"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((32, 32, 3)) * 80 + 60 * c).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_run_job_calibrates_before_training(tiny_backbones, tmp_path):
    from vistune.data import load_data
    from vistune.run import Job, preprocessing_for, run_job, transforms_for
    from vistune.training import TrainConfig

    folder = _image_folder(tmp_path / "data")
    backbone = tiny_backbones("vit")
    job = Job(backbone="vit", method="sct", data=str(folder), image_size=32,
              train=TrainConfig(epochs=1, batch_size=4, device="cpu", seed=0))
    metrics = run_job(job, backbone=backbone, progress=False)
    model = metrics["model"]
    assert model.calibrated and metrics["tuned_params_excluding_head"] == 2 * (4 * 4 + 4)
    prep = preprocessing_for(backbone, job)
    _, eval_tf = transforms_for({**prep, "augment": False})
    data = load_data(str(folder), train_transform=eval_tf, eval_transform=eval_tf, seed=0)
    expected = calibrate(backbone, data.train)
    assert [m.index.tolist() for m in model.sct] == [layer.indices.tolist() for layer in expected.layers]


def test_cli_calibrate_offers_every_placement():
    from vistune.cli import build_parser
    from vistune.methods.sct import PLACEMENTS as METHOD_PLACEMENTS

    parser = build_parser()
    calibrate_parser = parser._subparsers._group_actions[0].choices["calibrate"]
    option = next(a for a in calibrate_parser._actions if "--placement" in a.option_strings)
    assert list(option.choices) == list(METHOD_PLACEMENTS) == PLACEMENTS and option.default == "attn"


def test_cli_calibrate(tmp_path, capsys):
    from vistune.cli import main

    folder = _image_folder(tmp_path / "data")
    out = tmp_path / "channels.json"
    rc = main(["calibrate", "--backbone", "resnet10t", "--random-init", "--data", str(folder),
               "--image-size", "32", "--top-k", "5", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layer1" in printed and "layer4" in printed
    d = json.loads(out.read_text())
    assert d["num_images"] == 12 and d["class_counts"] == {"0": 4, "1": 4, "2": 4} and d["placement"] == "stage"
    assert [(layer["name"], layer["dim"], layer["k"]) for layer in d["layers"]] == [
        ("layer1", 64, 5), ("layer2", 128, 5), ("layer3", 256, 5), ("layer4", 512, 5)]
    for layer in d["layers"]:
        scores = np.array(layer["all_scores"])
        assert layer["indices"] == sorted(np.argsort(-scores)[:5].tolist())
        assert np.allclose(layer["scores"], scores[layer["indices"]])
    assert main(["calibrate", "--backbone", "resnet10t", "--random-init", "--data", str(folder),
                 "--image-size", "32", "--top-k", "999", "--quiet"]) == 2
    assert "exceeds the 64 channels" in capsys.readouterr().err


# ----------------------------------------------------------------------------- learning (slow, real)
@pytest.mark.slow
def test_sct_beats_linear_probe_on_real_efficientnet():
    """Real ImageNet EfficientNet-Lite0 → Fashion-MNIST (800 train / 200 val / 1000 test, 64 px).

    Measured on 2026-11-23, 2-core CPU (shared), 1 torch thread, seed 0, selection on val:
      linear (SGD, base lr 0.5, 50 epochs): val 0.805, test 0.781 (14 s)
      sct    (AdamW, base lr 0.01, 5 epochs, K = C/8 per stage, 2,608 params): val 0.830, test 0.799 (~40-110 s)
    Other settings measured the same day: linear 0.774-0.781 test (lr 0.5/1.0, 50/100 epochs, 1 or 2
    threads); sct 0.789-0.800 test (2-8 epochs, lr 0.01/0.03). The thresholds keep ~3 points of margin
    on the absolute numbers and require SCT to stay ahead of the probe by at least half a point
    (measured: +1.8).
    """
    from vistune.data import load_data
    from vistune.data.builtin import FASHION_MNIST_DIR
    from vistune.run import Job, preprocessing_for, run_job, transforms_for
    from vistune.training import TrainConfig

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("fashion-mnist is not installed")
    backbone = load_backbone("tf_efficientnet_lite0")
    if not backbone.spec.source.startswith("package:"):
        pytest.skip("the offline ImageNet EfficientNet-Lite0 package is not installed")
    probe = Job(backbone="tf_efficientnet_lite0", method="linear", data="fashion-mnist", image_size=64)
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, probe))
    data = load_data("fashion-mnist", train_transform=train_tf, eval_transform=eval_tf, train_size=800,
                     val_size=200, test_size=1000, seed=0)

    def run(method, epochs, lr, optimizer):
        job = Job(backbone="tf_efficientnet_lite0", method=method, data="fashion-mnist", image_size=64,
                  train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, optimizer=optimizer, seed=0, device="cpu"))
        return run_job(job, backbone=backbone, data=data, progress=False)

    linear = run("linear", 50, 0.5, "sgd")
    sct = run("sct", 5, 0.01, "adamw")
    assert sct["model"].calibrated and sct["tuned_params_excluding_head"] == 2608
    assert linear["test_accuracy"] >= 0.75  # measured 0.781
    assert sct["test_accuracy"] >= 0.77  # measured 0.799
    assert sct["test_accuracy"] >= linear["test_accuracy"] + 0.005  # measured +0.018
