"""Tests of the data layer: folder / list-file / built-in / tarball sources, splits, image conversion, transforms."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vistune.data import BUILTIN_DATASETS, DataSplits, build_transforms, load_data, load_image
from vistune.data import builtin as builtin_mod
from vistune.data.datasets import stratified_pick
from vistune.errors import VistuneError

CIFAR_TARBALL = Path(__file__).parents[2] / "shared/data/cifar10-jpeg.tar.gz"
CLASSES = ["cat", "dog", "fox"]


# --------------------------------------------------------------------------------------------- helpers
def tag_train(img):
    return ("train", img.size, img.mode)


def tag_eval(img):
    return ("eval", img.size, img.mode)


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0


def write_image(path: Path, colour=(10, 20, 30), size=16, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)


def make_folder(root: Path, splits: dict[str, dict[str, int]], ext=".png") -> Path:
    """root/<split>/<class>/<i>.png; every image a distinct colour so paths and pixels identify it."""
    for s, (split, classes) in enumerate(splits.items()):
        for c, (cls, n) in enumerate(classes.items()):
            for i in range(n):
                write_image(root / split / cls / f"{i:03d}{ext}", (40 * c, 10 * i, 50 * s))
    return root


def three_class(n=6):
    return {c: n for c in CLASSES}


def load(spec, **kw) -> DataSplits:
    return load_data(str(spec), train_transform=tag_train, eval_transform=tag_eval, **kw)


def error_of(fn, *args, **kw) -> VistuneError:
    with pytest.raises(VistuneError) as info:
        fn(*args, **kw)
    return info.value


# ---------------------------------------------------------------------------------------- folder form
def test_folder_with_val_and_test(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(6), "val": three_class(2), "test": three_class(3)})
    d = load(root)
    assert d.class_names == CLASSES
    assert (len(d.train), len(d.val), len(d.test)) == (18, 6, 9)
    assert d.val_from_train is False
    assert d.source == str(root)
    assert d.summary() == "18 train / 6 val / 9 test, 3 classes"
    assert sorted(np.bincount(d.train.labels)) == [6, 6, 6]
    x, y = d.train[0]
    assert x == ("train", (16, 16), "RGB") and isinstance(y, int) and y == 0
    assert d.val[0][0][0] == "eval" and d.test[0][0][0] == "eval"
    assert d.train[-1][1] == 2  # sorted class folders → labels; last image is of 'fox'


def test_folder_without_val_splits_train_stratified_and_seeded(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(10)})
    a = load(root, seed=0)
    b = load(root, seed=0)
    c = load(root, seed=1)
    assert a.val_from_train is True and a.test is None
    assert a.summary() == "24 train / 6 val / no test, 3 classes"
    assert a.val.paths == b.val.paths and a.train.paths == b.train.paths  # deterministic for a seed
    assert a.val.paths != c.val.paths  # and the seed matters
    assert not set(a.val.paths) & set(a.train.paths)
    assert sorted(a.val.paths + a.train.paths) == sorted(str(p) for p in (root / "train").rglob("*.png"))
    assert list(np.bincount(a.val.labels)) == [2, 2, 2]
    assert list(np.bincount(a.train.labels)) == [8, 8, 8]
    assert a.val[0][0][0] == "eval" and a.train[0][0][0] == "train"  # val split uses the eval transform


def test_val_fraction_and_tiny_classes_keep_every_class(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {"a": 2, "b": 2, "c": 9}})
    d = load(root, val_fraction=0.5)
    assert list(np.bincount(d.val.labels)) == [1, 1, 4]  # round(0.5 * 13) = 6, each class keeps one in train
    assert list(np.bincount(d.train.labels)) == [1, 1, 5]
    e = error_of(load, root, val_fraction=1.5)
    assert "val_fraction" in e.what


def test_train_size_and_val_size_are_stratified_disjoint_subsets(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(20), "test": three_class(2)})
    d = load(root, train_size=30, val_size=9, seed=3)
    assert (len(d.train), len(d.val), len(d.test)) == (30, 9, 6)
    assert list(np.bincount(d.train.labels)) == [10, 10, 10]
    assert list(np.bincount(d.val.labels)) == [3, 3, 3]
    assert not set(d.train.paths) & set(d.val.paths)
    again = load(root, train_size=30, val_size=9, seed=3)
    assert again.train.paths == d.train.paths and again.val.paths == d.val.paths
    e = error_of(load, root, train_size=100)
    assert "train_size=100" in e.what and "48" in e.what  # 60 - 12 split off for val
    e = error_of(load, root, train_size=0)
    assert "positive integer" in e.what


def test_val_size_caps_an_explicit_val_folder_and_final_protocol_merges(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(6), "val": three_class(4)})
    d = load(root, val_size=6)
    assert len(d.val) == 6 and list(np.bincount(d.val.labels)) == [2, 2, 2]
    assert error_of(load, root, val_size=13).what.startswith("val_size=13 exceeds")
    f = load(root, protocol="final")
    assert len(f.train) == 30 and len(f.val) == 12
    assert set(f.val.paths) <= set(f.train.paths)
    assert "train-val" in error_of(load, root, protocol="trainval").what  # suggestion


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(3)})
    (root / "train" / "empty_cls").mkdir()
    (root / "train" / "empty_cls" / "notes.txt").write_text("not an image")
    e = error_of(load, root)
    assert str(root / "train" / "empty_cls") in e.what and "no images" in e.what


def test_train_without_class_folders_is_an_error(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "train" / "loose.png")
    e = error_of(load, root)
    assert "no class folders" in e.what and "1 loose images" in e.what and str(root / "train") in e.what
    # a folder of class folders without train/ gets a hint
    other = make_folder(tmp_path / "other", {"x": three_class(1)}) / "x"
    e = error_of(load, other)
    assert "train/" in e.what and "cat" in e.what


def test_unknown_class_in_test_is_an_error_but_missing_one_is_fine(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(3), "test": {"cat": 2, "wolf": 1}})
    e = error_of(load, root)
    assert "wolf" in e.what and "cat, dog, fox" in e.what and str(root / "test") in e.what
    root2 = make_folder(tmp_path / "ds2", {"train": three_class(3), "test": {"dog": 2}})
    d = load(root2)
    assert list(d.test.labels) == [1, 1]


def test_hidden_files_and_extension_case(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(3)})
    write_image(root / "train" / "cat" / "UPPER.JPG", fmt="JPEG")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    d = load(root, val_size=3)
    paths = d.train.paths + d.val.paths
    assert any(p.endswith("UPPER.JPG") for p in paths)
    assert not any(".hidden" in p or ".ipynb" in p for p in paths)
    assert d.class_names == CLASSES


def test_dataset_is_picklable_and_works_with_a_dataloader(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(4)})
    d = load_data(str(root), train_transform=to_tensor, eval_transform=to_tensor)
    clone = pickle.loads(pickle.dumps(d.train))
    assert torch.equal(clone[1][0], d.train[1][0])
    digits = load_data("digits", train_transform=to_tensor, eval_transform=to_tensor, train_size=20)
    small = pickle.loads(pickle.dumps(digits.train))
    assert small.images.shape[0] == 20  # a subset pickles only its own images
    assert all(torch.equal(small[i][0], digits.train[i][0]) and small[i][1] == digits.train[i][1] for i in range(20))
    x, y = next(iter(torch.utils.data.DataLoader(d.train, batch_size=4, num_workers=0)))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


# ------------------------------------------------------------------------------------- list-file form
def make_list_folder(root: Path, files: dict[str, list[tuple[str, int]]], classes: list[str] | None = None) -> Path:
    for entries in files.values():
        for rel, label in entries:
            if not (root / rel).exists():
                write_image(root / rel, (label * 60, 0, 0))
    for name, entries in files.items():
        (root / name).write_text("".join(f"{rel} {label}\n" for rel, label in entries))
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def vtab_entries(n_per_class: int, start: int, classes=3, prefix="images/img "):
    return [(f"{prefix}{c}_{start + i}.png", c) for c in range(classes) for i in range(n_per_class)]


def test_list_files_both_protocols_and_classes_txt(tmp_path):
    train, val, test = vtab_entries(4, 0), vtab_entries(2, 100), vtab_entries(3, 200)
    root = make_list_folder(tmp_path / "vtab", {"train800.txt": train, "val200.txt": val,
                                                "train800val200.txt": train + val, "test.txt": test},
                            classes=["zero", "one", "two"])
    d = load(root)
    assert d.class_names == ["zero", "one", "two"]
    assert (len(d.train), len(d.val), len(d.test)) == (12, 6, 9) and d.val_from_train is False
    assert d.train.paths[0] == str(root / "images/img 0_0.png")  # spaces in paths
    assert d.train[0] == (("train", (16, 16), "RGB"), 0)
    f = load(root, protocol="final")
    assert len(f.train) == 18 and len(f.val) == 6
    assert sorted(f.train.paths) == sorted(d.train.paths + d.val.paths)
    # without classes.txt the names are the labels
    (root / "classes.txt").unlink()
    assert load(root).class_names == ["0", "1", "2"]


def test_list_files_fallbacks(tmp_path):
    train, val, test = vtab_entries(5, 0), vtab_entries(2, 100), vtab_entries(1, 200)
    only_tv = make_list_folder(tmp_path / "a", {"train800val200.txt": train + val, "test.txt": test})
    d = load(only_tv)
    assert d.val_from_train is True and len(d.train) + len(d.val) == 21 and len(d.test) == 3
    assert set(d.val.labels) == {0, 1, 2} and not set(d.val.paths) & set(d.train.paths)
    f = load(only_tv, protocol="final")
    assert len(f.train) == 21  # final trains on all of train800val200

    tv_and_val = make_list_folder(tmp_path / "b", {"train800val200.txt": train + val, "val200.txt": val})
    d = load(tv_and_val)
    assert len(d.train) == 15 and len(d.val) == 6 and d.test is None
    assert not set(d.val.paths) & set(d.train.paths)

    test_only = make_list_folder(tmp_path / "c", {"test.txt": test})
    assert "train800.txt" in error_of(load, test_only).what


def test_list_file_bad_label_and_missing_image(tmp_path):
    root = make_list_folder(tmp_path / "v", {"train800.txt": vtab_entries(2, 0)})
    with open(root / "train800.txt", "a") as f:
        f.write("images/img 0_0.png cat\n")
    e = error_of(load, root)
    assert str(root / "train800.txt") in e.what and "line 7" in e.what and "'cat'" in e.what

    root = make_list_folder(tmp_path / "w", {"train800.txt": vtab_entries(2, 0)}, classes=["a", "b"])
    e = error_of(load, root)  # label 2 with only 2 class names
    assert "line 5" in e.what and "out of range" in e.what and "classes.txt" in e.what

    root = make_list_folder(tmp_path / "x", {"train800.txt": vtab_entries(2, 0)})
    with open(root / "train800.txt", "a") as f:
        f.write("images/missing.png 1\n")
    e = error_of(load, root)
    assert str(root / "train800.txt") in e.what and "line 7" in e.what and "missing.png" in e.what

    root = make_list_folder(tmp_path / "y", {"train800.txt": vtab_entries(2, 0)})
    with open(root / "train800.txt", "a") as f:
        f.write("images/img 0_0.png -1\n")
    assert "negative" in error_of(load, root).what


# ---------------------------------------------------------------------------------------- image input
def test_load_image_converts_modes_to_rgb(tmp_path):
    cases = {
        "grey.png": Image.new("L", (4, 4), 77),
        "one_bit.png": Image.new("1", (4, 4), 1),
        "la.png": Image.new("LA", (4, 4), (77, 255)),
        "cmyk.jpg": Image.new("CMYK", (4, 4), (0, 0, 0, 0)),
        "rgba_transparent.png": Image.new("RGBA", (4, 4), (0, 0, 0, 0)),
    }
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    cases["palette.png"] = pal
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    cases["palette_transparent.png"] = pal_t
    for name, img in cases.items():
        img.save(tmp_path / name, **({"transparency": 1} if name == "palette_transparent.png" else {}))
    got = {name: load_image(tmp_path / name) for name in cases}
    for name, img in got.items():
        assert img.mode == "RGB" and img.size == (4, 4), name
    px = {name: img.getpixel((0, 0)) for name, img in got.items()}
    assert px["grey.png"] == (77, 77, 77)
    assert px["one_bit.png"] == (255, 255, 255)
    assert px["la.png"] == (77, 77, 77)
    assert all(v >= 250 for v in px["cmyk.jpg"])  # CMYK 0 ink = white
    assert px["rgba_transparent.png"] == (255, 255, 255)  # transparent → composited on white, not black
    assert px["palette.png"] == (200, 10, 10)
    assert px["palette_transparent.png"] == (255, 255, 255)


@pytest.mark.parametrize("value,expected", [(32768, 128), (65535, 255), (0, 0), (256, 1)])
def test_16_bit_images_scale_not_clip(tmp_path, value, expected):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), value, np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    img = load_image(path)
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (expected,) * 3


def test_32_bit_int_and_float_images(tmp_path):
    i32 = Image.fromarray(np.full((3, 3), 32768, np.int32))
    assert i32.mode == "I"
    i32.save(tmp_path / "i32.tif")
    assert load_image(tmp_path / "i32.tif").getpixel((0, 0)) == (128, 128, 128)
    f = Image.fromarray(np.full((3, 3), 0.5, np.float32))
    f.save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif").getpixel((0, 0)) == (128, 128, 128)


def test_corrupt_and_truncated_images_raise_clear_errors(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg at all" * 10)
    e = error_of(load_image, junk)
    assert str(junk) in e.what and "cannot read image" in e.what and e.fix == "remove or replace the file"

    full = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, format="JPEG", quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    e = error_of(load_image, cut)
    assert str(cut) in e.what and "truncated" in e.what
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    e = error_of(load_image, tmp_path / "nope.png")
    assert "no such file" in e.what


def test_corrupt_image_inside_a_dataset_names_the_file(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": three_class(3), "test": {"cat": 1}})
    bad = root / "test" / "cat" / "000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    d = load(root)
    e = error_of(d.test.__getitem__, 0)
    assert str(bad) in e.what


# ------------------------------------------------------------------------------------ stratified picks
def test_stratified_pick_is_proportional_and_keeps_small_classes():
    labels = np.array([0] * 100 + [1] * 10 + [2] * 1)
    picked, rest = stratified_pick(labels, 11, seed=0)
    assert len(picked) == 11 and len(rest) == 100
    assert list(np.bincount(labels[picked], minlength=3)) == [9, 1, 1]
    val, train = stratified_pick(labels, 20, seed=0, keep_one=True)
    assert 2 not in labels[val]  # the single image of class 2 stays in train
    assert set(labels[train]) == {0, 1, 2}
    assert len(val) == 20 and not set(val) & set(train)


# ------------------------------------------------------------------------------------------- built-ins
def test_unknown_builtin_name_suggests_and_lists(tmp_path):
    e = error_of(load, "fashon-mnist")
    assert "Did you mean 'fashion-mnist'" in e.what
    assert all(name in e.fix for name in BUILTIN_DATASETS)
    e = error_of(load, str(tmp_path / "no_such_dir"))
    assert "no such folder" in e.what
    assert "path" in error_of(load, "cifar10").what
    (tmp_path / "train800.txt").write_text("")
    assert "is a file" in error_of(load, tmp_path / "train800.txt").what


def test_digits_builtin():
    d = load("digits")
    assert d.class_names == [str(i) for i in range(10)]
    assert d.val_from_train is True and d.test is not None
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert 350 <= len(d.test) <= 370
    train_idx, val_idx, test_idx = set(d.train.indices), set(d.val.indices), set(d.test.indices)
    assert not train_idx & test_idx and not val_idx & test_idx and not train_idx & val_idx
    assert set(d.test.labels) == set(range(10))
    other = load("digits", seed=5)
    assert list(other.test.indices) == list(d.test.indices)  # the test split never depends on seed
    assert list(other.val.indices) != list(d.val.indices)
    (tag, size, mode), label = d.train[0]
    assert size == (8, 8) and mode == "RGB" and isinstance(label, int)
    assert d.train.images.max() == 255  # 0..16 scaled to 0..255


def test_mnist5k_builtin():
    d = load("mnist5k", train_size=100, val_size=50)
    assert len(d.test) == 1000 and list(np.bincount(d.test.labels)) == [100] * 10
    assert len(d.train) == 100 and len(d.val) == 50
    assert list(np.bincount(d.train.labels)) == [10] * 10
    img = d.train.image(0)
    assert img.size == (28, 28) and img.mode == "RGB" and np.asarray(img).max() > 100
    assert not set(d.train.indices) & set(d.test.indices)


def test_fashion_mnist_builtin():
    if not (builtin_mod.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    d = load_data("fashion-mnist", train_transform=to_tensor, eval_transform=to_tensor)
    assert d.summary() == "48000 train / 12000 val / 10000 test, 10 classes"
    assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"
    x, y = d.test[0]
    assert x.shape == (3, 28, 28) and y == 9  # the first t10k image is an ankle boot
    assert list(np.bincount(d.test.labels)) == [1000] * 10


def test_fashion_mnist_missing_tells_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_mod, "FASHION_MNIST_DIR", tmp_path / "none")
    e = error_of(load, "fashion-mnist")
    assert "apt-get install -y dataset-fashion-mnist" in e.fix


# --------------------------------------------------------------------------------------------- tarballs
def make_tarball(path: Path, top: str = "", per_class=3, classes=("bird", "cat")) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        def add(name, data):
            info = tarfile.TarInfo(top + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for split, n in (("train", per_class), ("test", 1)):
            for c, cls in enumerate(classes):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.new("RGB", (8, 8), (100 * c, 20 * i, 0)).save(buf, format="JPEG")
                    add(f"{split}/{cls}/{i:04d}.jpg", buf.getvalue())
        add("train/cat/._0000.jpg", b"macOS resource fork")
        add("README.txt", b"hello")
    return path


def test_tiny_tarball_is_read_in_memory_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VISTUNE_CACHE_DIR", str(tmp_path / "cache"))
    tarball = make_tarball(tmp_path / "tiny.tar.gz", per_class=5)
    d = load(f"cifar10:{tarball}")
    assert d.class_names == ["bird", "cat"]
    assert (len(d.train) + len(d.val), len(d.test)) == (10, 2)
    assert d.train.images.shape[1:] == (8, 8, 3) and d.train.images.dtype == np.uint8
    assert d.train[0][0] == ("train", (8, 8), "RGB")
    cached = list((tmp_path / "cache").glob("tiny-*.npz"))
    assert len(cached) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))  # written atomically, nothing left behind
    assert not (tmp_path / "train").exists()  # nothing extracted to disk

    def no_decoding(path):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(builtin_mod, "_decode_tarball", no_decoding)
    again = load(f"cifar10:{tarball}")
    assert np.array_equal(again.train.images, d.train.images) and again.class_names == d.class_names
    os.utime(tarball, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed tarball is decoded anew
    with pytest.raises(AssertionError, match="decoded again"):
        load(f"cifar10:{tarball}")


def test_tarball_with_top_level_folder_and_extracted_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VISTUNE_CACHE_DIR", str(tmp_path / "cache"))
    tarball = make_tarball(tmp_path / "wrapped.tar.gz", top="cifar10/")
    d = load(tarball)  # a bare tarball path works too
    assert d.class_names == ["bird", "cat"] and len(d.test) == 2
    assert list(d.test.labels) == [0, 1]
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp_path / "x", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    e = load(f"cifar10:{tmp_path / 'x' / 'cifar10'}")
    assert e.class_names == ["bird", "cat"] and len(e.test) == 2
    assert np.array_equal(np.asarray(e.test.image(1)), d.test.image(1))


def test_tarball_with_corrupt_member_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VISTUNE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("train/cat/0001.jpg")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"xxxxx"))
    e = error_of(load, f"cifar10:{path}")
    assert "train/cat/0001.jpg" in e.what and str(path) in e.what


@pytest.mark.slow
def test_real_cifar10_tarball(tmp_path, monkeypatch):
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"{CIFAR_TARBALL} not present")
    monkeypatch.setenv("VISTUNE_CACHE_DIR", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    d = load_data(f"cifar10:{CIFAR_TARBALL}", train_transform=to_tensor, eval_transform=to_tensor)
    first = time.perf_counter() - t0
    assert d.summary() == "40000 train / 10000 val / 10000 test, 10 classes"
    assert d.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert list(np.bincount(d.test.labels)) == [1000] * 10
    assert d.train[0][0].shape == (3, 32, 32)
    t0 = time.perf_counter()
    again = load_data(f"cifar10:{CIFAR_TARBALL}", train_transform=None, eval_transform=None,
                      train_size=800, val_size=200)
    second = time.perf_counter() - t0
    assert second < 5 and second < first / 3
    assert list(np.bincount(again.train.labels)) == [80] * 10 and list(np.bincount(again.val.labels)) == [20] * 10


# ------------------------------------------------------------------------------------------- transforms
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
               "std": (0.25, 0.25, 0.25), "crop_pct": 0.8}


def test_vtab_transforms_resize_square_and_normalize():
    train_tf, eval_tf = build_transforms(DATA_CONFIG)
    img = Image.new("RGB", (50, 20), (255, 128, 0))
    x = train_tf(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((32, 32), 2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(x[2], torch.full((32, 32), -2.0))
    assert torch.equal(eval_tf(img), x)  # same deterministic transform for train and eval
    x16 = build_transforms(DATA_CONFIG, image_size=16)[0](img)
    assert x16.shape == (3, 16, 16)


def test_paper_normalization_and_bad_value():
    img = Image.new("RGB", (8, 8), (0, 0, 0))
    x = build_transforms(DATA_CONFIG, normalization="paper")[1](img)
    assert torch.allclose(x[:, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    e = error_of(build_transforms, DATA_CONFIG, normalization="papr")
    assert "'paper'" in e.what and "pretrained_cfg" in e.fix


def test_augment_transforms_crop_and_flip():
    train_tf, eval_tf = build_transforms(DATA_CONFIG, augment=True)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    resize, crop = eval_tf.transforms[:2]
    assert type(resize).__name__ == "Resize" and resize.size == 40  # int(32 / 0.8)
    assert type(crop).__name__ == "CenterCrop"
    img = Image.new("RGB", (60, 45), (10, 200, 30))
    assert train_tf(img).shape == (3, 32, 32) and eval_tf(img).shape == (3, 32, 32)
