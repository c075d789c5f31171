"""MultiTask: one frozen backbone, many artifacts, mixed batches whose logits equal each artifact run alone."""
from __future__ import annotations

import pytest
import torch

from artifact_factory import make_artifact, methods_for, perturbed
from conftest import IMAGE_SIZE, tiny_backbone
from vistune.artifacts import load_artifact
from vistune.backbones import load_backbone
from vistune.errors import VistuneError
from vistune.multitask import MultiTask


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def _trunk_passes(mt: MultiTask) -> list[int]:
    """A counter of the trunk's first module's calls (one per backbone pass)."""
    first = next(iter(mt.trunk.model.children()))
    calls = [0]
    first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("kind", ["vit", "swin", "mobilenet"])
def test_mixed_batch_equals_every_artifact_alone(tiny_backbones, tmp_path, kind):
    backbone = tiny_backbones(kind)
    tasks = {m: {} for m in methods_for(backbone)}
    if kind == "vit":  # a second prompt length (its own pass) and VPT-deep beside VPT-shallow at length 2
        tasks["vpt-deep-3"] = {"num_tokens": 3}
    dirs, models = {}, {}  # the saved models themselves (artifacts round-trip to identical logits: test_artifacts)
    for seed, (name, sets) in enumerate(tasks.items()):
        method = name.removesuffix("-3")
        dirs[name] = make_artifact(backbone, method, tmp_path / name, num_classes=3 + seed % 3, seed=seed, sets=sets,
                                   keep=models)
    mt = MultiTask(backbone, dirs)
    runs = {d["task"]: d for d in mt.describe()}
    # every other method shares the pass; VQT's query tokens and E²VPT's key-value prompts are not routed per row
    # yet, so those tasks run their own pass in the same call
    assert {t for t, d in runs.items() if d["run"] == "own"} == {"full"} | ({"vqt", "e2vpt"} & set(tasks))

    names = list(dirs) * 2
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(0)).tolist()
    names = [names[i] for i in order]
    x = torch.randn(len(names), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    passes = _trunk_passes(mt)
    out = mt(x, names)
    # one trunk pass per prompt length: 0 (all module/head methods) on every family, 2 and 3 on ViT
    assert passes[0] == (3 if kind == "vit" else 1)
    rows = out.split()
    for name, path in dirs.items():
        idx = [i for i, n in enumerate(names) if n == name]
        alone = models[path]
        with torch.no_grad():
            expected = alone(x[idx])
            if not alone.trains_head_only:  # the task really changes the frozen model (the test would see a slip)
                feats, stock = alone.features(x[idx]), backbone.forward_features(x[idx])
                # VQT's features are the pooled feature beside its query outputs: another shape, plainly changed
                assert feats.shape != stock.shape or (feats - stock).abs().max() > 1e-4, name
        got = torch.stack([rows[i] for i in idx])
        assert got.shape == expected.shape == (len(idx), alone.num_classes)
        assert (got - expected).abs().max() < 1e-5, (name, (got - expected).abs().max().item())


def test_logits_are_padded_with_minus_inf_and_give_each_row_its_own_probabilities(tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    mt = MultiTask(backbone, {"two": make_artifact(backbone, "linear", tmp_path / "a", num_classes=2),
                              "five": make_artifact(backbone, "bias", tmp_path / "b", num_classes=5, seed=1)})
    out = mt(torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE), ["two", "five", "two"])
    assert out.logits.shape == (3, 5) and out.num_classes == [2, 5, 2] and out.tasks == ["two", "five", "two"]
    assert torch.isinf(out.logits[[0, 2], 2:]).all() and torch.isfinite(out.logits[1]).all()
    assert out.mask.tolist()[0] == [True, True, False, False, False]
    probs = out.probabilities()
    assert torch.allclose(probs.sum(-1), torch.ones(3)) and (probs[0, 2:] == 0).all()


def test_an_artifact_of_other_backbone_weights_is_refused_by_name(tiny_backbones, tmp_path):
    other = load_backbone("vit_tiny_patch16_224", random_init=True,
                          model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2))
    path = make_artifact(other, "linear", tmp_path / "elsewhere")
    with pytest.raises(VistuneError, match=r"task 'elsewhere'.*elsewhere.*trained on backbone"):
        MultiTask(tiny_backbones("vit"), [path])


def test_tasks_are_added_and_removed_between_batches(tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    lora = make_artifact(backbone, "lora", tmp_path / "lora", seed=3)
    mt = MultiTask(backbone, [make_artifact(backbone, "ssf", tmp_path / "ssf")])
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    info = mt.add(lora)
    assert info.name == "lora" and list(mt.tasks) == ["ssf", "lora"]
    alone, _ = load_artifact(lora, backbone=backbone)
    with torch.no_grad():
        assert (torch.stack(mt(x, ["lora", "lora"]).split()) - alone(x)).abs().max() < 1e-5
    with pytest.raises(VistuneError, match="'lora' is already loaded"):
        mt.add(lora)
    mt.remove("ssf")
    with pytest.raises(VistuneError, match="unknown task 'ssf'"):
        mt(x, ["ssf", "lora"])
    assert mt(x, ["lora", "lora"]).logits.shape == (2, 3)


def test_images_of_other_sizes_run_as_one_pass_per_size(tmp_path):
    backbone = tiny_backbone("resnet")
    a = make_artifact(backbone, "ssf", tmp_path / "a", image_size=32)
    b = make_artifact(backbone, "adapter", tmp_path / "b", seed=1, image_size=48)
    mt = MultiTask(backbone, [a, b])
    images = [torch.randn(3, 32, 32), torch.randn(3, 48, 48), torch.randn(3, 32, 32)]
    passes = _trunk_passes(mt)
    rows = mt(images, ["a", "b", "a"]).split()
    assert passes[0] == 2
    for path, i in ((a, 0), (b, 1), (a, 2)):
        alone, _ = load_artifact(path, backbone=backbone)
        with torch.no_grad():
            assert (rows[i] - alone(images[i][None])[0]).abs().max() < 1e-5


def test_the_callers_backbone_stays_bit_identical(tiny_backbones, tmp_path):
    backbone = tiny_backbones("swin")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    mt = MultiTask(backbone, [make_artifact(backbone, m, tmp_path / m, seed=i)
                              for i, m in enumerate(["bias", "ln-tuning", "partial", "vpt-deep"])])
    mt(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE), [0, 1, 2, 3])
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    assert perturbed(backbone, "bias", 3, 0) is not None  # the factory never writes the frozen tensors either
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
