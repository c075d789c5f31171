"""Semantic segmentation: seg-digits (deterministic, exact masks), the folder reader, paired transforms, the FPN
decoder on every family, refusal by token/calibration/cache methods, mIoU, artifacts and the CLI. The learning
test (Pro-tuning beats decoder-only in mIoU on real ImageNet weights) is a slow one in test_learning_real.py."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vistune.cli as cli_mod
from conftest import IMAGE_SIZE, TINY
from vistune.artifacts import load_artifact, read_meta, save_artifact
from vistune.data.builtin import load_mnist5k
from vistune.data.segmentation import (
    CANVAS,
    IGNORE_INDEX,
    SEG_DIGITS_CLASSES,
    SegTransform,
    _generate,
    _SEEDS,
    glyph,
    load_segmentation_data,
    read_mask,
    seg_digits_arrays,
    write_mask_png,
)
from vistune.errors import VistuneError
from vistune.training.metrics import confusion_matrix, scores_from_confusion
from vistune.methods import METHODS, adapt, make_config
from vistune.training import TrainConfig, evaluate, train
from vistune.training import trainer as trainer_mod

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
SEG_METHODS = ["linear", "pro-tuning", "adapter", "bias", "partial", "full"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models run fastest on one torch thread (conftest.one_thread)."""


def tf32():
    return SegTransform((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), IMAGE_SIZE, "bilinear")


# ------------------------------------------------------------------------------------------ seg-digits
def test_seg_digits_is_deterministic_with_the_stated_sizes_and_classes():
    arrays = seg_digits_arrays()
    images, masks, placements, digits = arrays["trainval"]
    assert images.shape == (1000, CANVAS, CANVAS, 3) and masks.shape == (1000, CANVAS, CANVAS)
    assert arrays["test"][0].shape[0] == 500
    assert set(np.unique(masks)) == set(range(11)) and len(SEG_DIGITS_CLASSES) == 11
    # a fresh build from the same seed gives the same pixels (the first items of the seeded stream)
    again = _generate(5, _SEEDS["trainval"], digits, load_mnist5k()["train"].labels)
    assert np.array_equal(again[0], images[:5]) and np.array_equal(again[1], masks[:5])
    data = load_segmentation_data("seg-digits", train_transform=None, eval_transform=None)
    assert (len(data.train), len(data.val), len(data.test)) == (800, 200, 500)
    assert data.class_names == SEG_DIGITS_CLASSES


def test_seg_digits_masks_are_exact():
    """Recomposite independently: the mask is the class of the topmost digit with alpha ≥ 0.5, and where one
    digit alone is (nearly) opaque the pixel carries that digit's colour and a digit label."""
    images, masks, placements, digits = seg_digits_arrays()["trainval"]
    checked = 0
    for i in range(40):
        want = np.zeros((CANVAS, CANVAS), np.uint8)
        top_alpha = np.zeros((CANVAS, CANVAS), np.uint8)
        top_colour = np.zeros((CANVAS, CANVAS, 3), np.int64)
        cover = np.zeros((CANVAS, CANVAS), np.int64)  # how many digits touch the pixel
        for idx, cls, y, x, size, colour in placements[i]:
            a = glyph(digits[idx], size)
            sl = (slice(y, y + size), slice(x, x + size))
            want[sl][a >= 128] = cls + 1  # 128/255 ≥ 0.5 > 127/255
            top_alpha[sl] = np.where(a > 0, a, top_alpha[sl])
            top_colour[sl] = np.where((a > 0)[..., None], np.asarray(colour), top_colour[sl])
            cover[sl] += a > 0
        assert np.array_equal(masks[i], want), i
        # where one digit alone is (nearly) opaque, the pixel is its colour up to (1 - alpha)·255
        solid = (top_alpha >= 240) & (cover == 1)
        gap = np.abs(images[i][solid].astype(np.int64) - top_colour[solid]).max(-1)
        assert (gap <= 255 - top_alpha[solid].astype(np.int64) + 1).all()
        assert (masks[i][solid] > 0).all()
        checked += int(solid.sum())
    assert checked > 1000


def test_paired_transform_resizes_masks_by_nearest_and_flips_both():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :20] = 3
    mask[0, 0] = IGNORE_INDEX
    x, y = tf32()(img, mask)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 3, IGNORE_INDEX}  # nearest: no blended labels
    flip = SegTransform((0.5,) * 3, (0.5,) * 3, 32, "bilinear", flip=True)
    torch.manual_seed(0)
    outs = [flip(img, mask) for _ in range(8)]
    flipped = [o for o in outs if o[1][5, -1] == 3]
    assert flipped and all(torch.allclose(fx, x.flip(-1)) for fx, _ in flipped)


# ------------------------------------------------------------------------------------------ folder form
def _write_pair(root: Path, img_dir: str, mask_dir: str, stem: str, label: int, size=(40, 48)) -> None:
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((*size, 3), np.uint8)
    rgb[:, : size[1] // 2] = 200
    Image.fromarray(rgb).save(root / img_dir / f"{stem}.jpg")
    m = np.zeros(size, np.uint8)
    m[:, : size[1] // 2] = label
    m[-1] = IGNORE_INDEX  # VOC-style border
    write_mask_png(root / mask_dir / f"{stem}.png", m)


def test_folder_with_split_files_and_palette_masks(tmp_path):
    for i in range(6):
        _write_pair(tmp_path, "images", "masks", f"im{i}", 1 + i % 2)
    (tmp_path / "train.txt").write_text("im0\nim1\nim2\nim3\n")
    (tmp_path / "val.txt").write_text("im4\nim5\n")
    assert Image.open(tmp_path / "masks" / "im0.png").mode == "P"
    data = load_segmentation_data(str(tmp_path), train_transform=tf32(), eval_transform=tf32())
    assert (len(data.train), len(data.val), data.test) == (4, 2, None)
    assert data.class_names == ["0", "1", "2"]
    x, y = data.val[0]
    assert x.shape == (3, 32, 32) and set(y.unique().tolist()) == {0, 1, IGNORE_INDEX}


def test_folder_with_split_subfolders_as_ade20k(tmp_path):
    for split, n in (("training", 4), ("validation", 2)):
        for i in range(n):
            _write_pair(tmp_path, f"images/{split}", f"annotations/{split}", f"{split}{i}", 1)
    (tmp_path / "classes.txt").write_text("sky\nwall\n")
    data = load_segmentation_data(str(tmp_path), train_transform=tf32(), eval_transform=tf32())
    assert (len(data.train), len(data.val)) == (4, 2) and data.class_names == ["sky", "wall"]


def test_folder_refuses_rgb_masks_and_missing_masks(tmp_path):
    _write_pair(tmp_path, "images", "masks", "a", 1)
    _write_pair(tmp_path, "images", "masks", "b", 1)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(VistuneError, match="not an index mask"):
        read_mask(tmp_path / "masks" / "b.png")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "images" / "c.png")
    with pytest.raises(VistuneError, match="has no mask"):
        load_segmentation_data(str(tmp_path), train_transform=None, eval_transform=None)
    with pytest.raises(VistuneError, match="classification data set"):
        load_segmentation_data("mnist5k", train_transform=None, eval_transform=None)


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kind", list(TINY))
def test_decoder_gives_per_pixel_logits_on_every_family(tiny_backbones, kind):
    backbone = tiny_backbones(kind)
    for name in ("linear", "pro-tuning"):
        torch.manual_seed(0)
        model = adapt(backbone, make_config(name), 5, task="segmentation")
        assert model.task == "segmentation" and model.trains_head_only is False
        assert model.eval()(X).shape == (2, 5, IMAGE_SIZE, IMAGE_SIZE)
    if not backbone.transformer:  # the last 4 feature levels, strides 4..32
        assert [f.shape[-1] for f in model.dense_features(X)] == [IMAGE_SIZE // s for s in (4, 8, 16, 32)]


def test_one_step_trains_only_prompts_and_decoder_and_leaves_the_backbone_bit_identical(tiny_backbones):
    backbone = tiny_backbones("efficientnet")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    torch.manual_seed(0)
    model = adapt(backbone, make_config("pro-tuning"), 4, task="segmentation")
    frozen = {k: v.clone() for k, v in model.frozen_state().items()}
    target = torch.randint(0, 4, (2, IMAGE_SIZE, IMAGE_SIZE))
    target[:, 0] = IGNORE_INDEX
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model.train()(X), target, ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("head.") or ".prompt." in n for n in grads)
    assert any(".prompt." in n for n in grads)
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())
    assert all(torch.equal(v, frozen[k]) for k, v in model.frozen_state().items())


def test_methods_that_cannot_segment_are_refused(tiny_backbones):
    able = {n for n, i in METHODS.items() if i.method_class.supports_segmentation}
    assert set(SEG_METHODS) <= able
    for name in ("vpt-shallow", "vpt-deep", "vpt-pad", "pgn", "sct", "mlp", "sidetune"):
        assert name not in able
    with pytest.raises(VistuneError, match="(?s)does not support segmentation.*linear = frozen backbone"):
        adapt(tiny_backbones("vit"), make_config("vpt-shallow"), 3, task="segmentation")
    with pytest.raises(VistuneError, match="does not support segmentation"):
        adapt(tiny_backbones("resnet"), make_config("mlp"), 3, task="segmentation")
    with pytest.raises(VistuneError, match="unknown task"):
        adapt(tiny_backbones("resnet"), make_config("linear"), 3, task="detection")


@pytest.mark.parametrize("name", ["pro-tuning", "linear"])
def test_artifact_round_trips_the_decoder_to_identical_logits(tiny_backbones, tmp_path, name):
    backbone = tiny_backbones("resnet")
    torch.manual_seed(0)
    model = adapt(backbone, make_config(name), 4, task="segmentation")
    with torch.no_grad():  # move every tuned tensor (incl. BN statistics of the decoder) off its init
        for k, v in model.tuned_state_dict().items():
            if v.is_floating_point():
                v.add_(0.01 * torch.randn_like(v))
    model.eval()
    save_artifact(model, tmp_path, class_names=list("abcd"), preprocessing={})
    meta = read_meta(tmp_path)
    assert meta["task"] == "segmentation" and any(k.startswith("head.fpn.") for k in meta["tensors"])
    loaded, _ = load_artifact(tmp_path, backbone=backbone)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


# --------------------------------------------------------------------------------------------- metrics
def test_miou_matches_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    conf = confusion_matrix(pred, target, 4)
    #            pred 0 1 2 3
    hand = torch.tensor([[2, 1, 0, 0],   # truth 0
                         [0, 2, 0, 0],   # truth 1
                         [1, 0, 1, 0],   # truth 2
                         [0, 0, 0, 0]])  # truth 3 (absent from truth and, the ignored pixel aside, from pred)
    assert torch.equal(conf, hand)
    s = scores_from_confusion(conf)
    # IoU0 = 2/(3+3-2) = 1/2, IoU1 = 2/(2+3-2) = 2/3, IoU2 = 1/(2+1-1) = 1/2, class 3 left out
    assert s["iou"][3] is None
    assert s["iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)


class _Fixed(torch.nn.Module):
    """Returns stored logits for the batch (a model whose predictions are known)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.i, self.num_classes, self.task = logits, 0, logits.shape[1], "segmentation"

    def forward(self, x):
        out = self.logits[self.i:self.i + len(x)]
        self.i += len(x)
        return out


def test_evaluate_reports_miou_and_sums_the_confusion_matrix_across_processes(monkeypatch):
    target = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [255, 0]]])
    pred = torch.tensor([[[0, 1], [1, 1]], [[2, 0], [3, 0]]])
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    ds = [(torch.zeros(3, 2, 2), t) for t in target]
    res = evaluate(_Fixed(logits), ds, batch_size=1)
    s = scores_from_confusion(confusion_matrix(pred, target, 4))
    assert res["miou"] == pytest.approx(s["miou"]) and res["accuracy"] == pytest.approx(5 / 7) and res["n"] == 2
    # under torchrun every process's counts are all-reduced: two processes with the same counts → same scores
    monkeypatch.setattr(trainer_mod.distributed, "active", lambda: True)
    monkeypatch.setattr(trainer_mod.distributed, "rank", lambda: 0)
    monkeypatch.setattr(trainer_mod.distributed, "world_size", lambda: 1)
    monkeypatch.setattr(trainer_mod.distributed, "sum_across", lambda v, d: [2 * a for a in v])
    res2 = evaluate(_Fixed(logits), ds, batch_size=1)
    assert res2["miou"] == pytest.approx(res["miou"]) and res2["n"] == 4


def test_train_selects_on_val_miou_without_the_feature_cache(tiny_backbones, monkeypatch):
    def no_cache(*a, **k):
        raise AssertionError("segmentation must not use the pooled-feature cache")

    monkeypatch.setattr(trainer_mod, "FeatureCache", no_cache)
    data = load_segmentation_data("seg-digits", train_transform=tf32(), eval_transform=tf32(), train_size=8,
                                  val_size=4)
    torch.manual_seed(0)
    model = adapt(tiny_backbones("resnet"), make_config("linear"), 11, task="segmentation")
    res = train(model, data.train, data.val, TrainConfig(epochs=2, batch_size=4, device="cpu"), progress=False)
    best = max(res.history, key=lambda h: h["val_miou"])
    assert res.val_miou == best["val_miou"] and res.best_epoch == best["epoch"]
    assert res.val_accuracy == best["val_accuracy"]


# ------------------------------------------------------------------------------------------------- CLI
def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_mod.main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_cli_train_eval_predict_mask_out(tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli("train", "--backbone", "resnet10t", "--random-init", "--image-size", "32", "--method",
                     "pro-tuning", "--task", "segmentation", "--data", "seg-digits", "--train-size", "8",
                     "--val-size", "4", "--epochs", "1", "--batch-size", "4", "--quiet", "--device", "cpu",
                     "--out", out)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and 0 <= metrics["test_miou"] <= 1
    rc, stdout, err = cli("eval", "--adapter", out, "--data", "seg-digits", "--json", "--quiet", "--device", "cpu")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["miou"] == pytest.approx(metrics["test_miou"]) and res["n"] == 500
    img = tmp_path / "photo.png"
    Image.fromarray(seg_digits_arrays()["test"][0][0][:100, :90]).save(img)
    rc, stdout, err = cli("predict", "--adapter", out, img, "--mask-out", tmp_path / "masks", "--device", "cpu")
    assert rc == 0, err
    mask = Image.open(tmp_path / "masks" / "photo.png")
    assert mask.mode == "P" and mask.size == (90, 100)
    assert int(np.asarray(mask).max()) < len(SEG_DIGITS_CLASSES) and "photo.png" in stdout
    rc, _, err = cli("train", "--backbone", "resnet10t", "--random-init", "--method", "linear", "--data",
                     "seg-digits", "--out", tmp_path / "x", "--quiet")
    assert rc == 2 and "--task segmentation" in err
    rc, _, err = cli("train", "--backbone", "resnet10t", "--random-init", "--method", "mlp", "--task",
                     "segmentation", "--data", "seg-digits", "--out", tmp_path / "y", "--quiet")
    assert rc == 2 and "does not support segmentation" in err
