"""`vistune data vtab`: the list-file writer (fed an in-memory example iterator), VTAB's split and label
definitions, and the refusals without tensorflow-datasets or without a network (no download here)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from vistune.cli import main
from vistune.data import load_data
from vistune.data import vtab_download as vtab
from vistune.errors import VistuneError

CLASSES = ["left", "right", "up"]


def fake_examples(n: int, seed: int, grey: bool = False):
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (10, 12, 1) if grey else (10, 12, 3)
        yield rng.integers(0, 256, shape, dtype=np.uint8), i % len(CLASSES)


def write(folder: Path) -> dict:
    examples = {"train800": fake_examples(6, 0), "val200": fake_examples(3, 1), "test": fake_examples(4, 2)}
    return vtab.write_task(folder, examples, CLASSES, {"tfds_name": "fake:1.0.0"})


def test_writer_produces_the_list_file_layout_the_loader_reads(tmp_path):
    folder = tmp_path / "vtab" / "fake_task"
    manifest = write(folder)
    assert manifest["counts"] == {"train800": 6, "val200": 3, "test": 4}
    assert (folder / "train800.txt").read_text().splitlines()[:2] == ["images/train800/000000.png 0",
                                                                       "images/train800/000001.png 1"]
    lists = {n: (folder / n).read_text().splitlines() for n in ("train800.txt", "val200.txt", "train800val200.txt")}
    assert lists["train800val200.txt"] == lists["train800.txt"] + lists["val200.txt"]
    assert (folder / "classes.txt").read_text().splitlines() == CLASSES
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no staging folder left behind"
    # the images are the examples, bit for bit (PNG is lossless)
    from PIL import Image

    first = next(fake_examples(1, 2))[0]
    assert np.array_equal(np.asarray(Image.open(folder / "images/test/000000.png")), first)
    # vistune reads it as a VTAB-1k folder: train800 / val200 / test, with the class names
    data = load_data(str(folder), train_transform=None, eval_transform=None)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 4) and data.class_names == CLASSES
    assert not data.val_from_train
    # the manifest's checksums cover every file and catch a changed one
    assert set(manifest["sha256"]) >= {"train800.txt", "test.txt", "classes.txt", "images/val200/000002.png"}
    assert vtab.verify_task(folder) == []
    (folder / "test.txt").write_text("images/test/000000.png 1\n")
    assert vtab.verify_task(folder) == ["test.txt"]


def test_an_interrupted_write_leaves_nothing_and_an_existing_task_is_not_overwritten(tmp_path):
    def broken():
        yield from fake_examples(2, 0)
        raise KeyboardInterrupt

    folder = tmp_path / "task"
    with pytest.raises(KeyboardInterrupt):
        vtab.write_task(folder, {"train800": broken(), "val200": [], "test": []}, CLASSES, {})
    assert list(tmp_path.iterdir()) == []
    write(folder)
    with pytest.raises(VistuneError, match="already exists"):
        write(folder)


def test_grey_and_binary_images_become_rgb():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    assert vtab._rgb(grey, 1).shape == (2, 3, 3)
    assert vtab._rgb(np.ones((2, 2, 1), np.uint8), 255).max() == 255  # dSprites' 0/1 pixels


def test_vtab_split_and_label_definitions():
    assert len(vtab.TASKS) == 19
    assert vtab.TASKS["caltech101"].splits({"train": 3060, "test": 6084}) == {
        "train800": "train[:800]", "val200": "train[2754:2954]", "test": "test"}
    assert vtab.TASKS["eurosat"].splits({"train": 27000})["test"] == "train[21600:]"
    assert vtab.TASKS["clevr_count"].splits({"train": 70000})["test"] == "validation"
    assert vtab.TASKS["smallnorb_ele"].splits({})["val200"] == "test[:200]"
    assert vtab.TASKS["clevr_count"].label({"objects": {"size": np.zeros(5)}}) == 2
    assert vtab.TASKS["clevr_dist"].label({"objects": {"pixel_coords": np.array([[0, 0, 9.2], [0, 0, 12.0]])}}) == 3
    kitti = {"objects": {"type": np.array([0, 4]), "location": np.array([[0, 0, 15.0], [0, 0, 2.0]])}}
    assert vtab.TASKS["kitti"].label(kitti) == 1  # the closest vehicle (type < 3) is 15 m away; a pedestrian is ignored
    assert vtab.TASKS["dsprites_ori"].label({"label_orientation": 39}) == 15
    assert vtab.TASKS["dsprites_loc"].label({"label_x_position": 31}) == 15
    assert vtab.TASKS["smallnorb_azi"].label({"label_azimuth": 7}) == 7


def test_without_tensorflow_datasets_it_refuses_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(VistuneError, match="needs tensorflow-datasets") as e:
        vtab.download(tmp_path, ["dtd"])
    assert "vistune[vtab]" in e.value.fix
    assert main(["data", "vtab", "--download", "--out", str(tmp_path), "--tasks", "dtd"]) == 2
    assert "vistune[vtab]" in capsys.readouterr().err


def test_offline_it_refuses_before_tfds_tries_to_download(tmp_path, monkeypatch):
    prepared = []

    class Builder:  # tfds's builder as far as download() uses it before it needs the network
        def is_prepared(self):
            return False

        def download_and_prepare(self):
            prepared.append(True)

    fake_tfds = types.SimpleNamespace(builder=lambda name, data_dir=None: Builder())
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(vtab.socket, "create_connection", no_network)
    with pytest.raises(VistuneError, match="cannot reach") as e:
        vtab.download(tmp_path, ["dtd"])
    assert "internet" in e.value.fix and not prepared and list(tmp_path.iterdir()) == []


def test_unknown_task_and_verifying_a_missing_download(tmp_path, capsys):
    with pytest.raises(VistuneError, match="unknown VTAB-1k task"):
        vtab.select_tasks(["dtd", "cifar10"])
    assert main(["data", "vtab", "--out", str(tmp_path), "--tasks", "dtd"]) == 2
    assert "--download" in capsys.readouterr().err
    write(tmp_path / "dtd")
    assert main(["data", "vtab", "--out", str(tmp_path), "--tasks", "dtd"]) == 0
