"""The data layer's trust checks: each image read once (links, loops), list paths kept inside their folder,
splits lacking classes, where val came from and its seed, oversized images, the decode check, and the
data package's import graph."""
from __future__ import annotations

import ast
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistune.data import DataWarning, load_data, load_image, verify_decodable
from vistune.data.segmentation import load_segmentation_data
from vistune.errors import VistuneError

CLASSES = ["cat", "dog", "fox"]
DATA_PKG = Path(__file__).parents[1] / "src" / "vistune" / "data"


def write_image(path: Path, colour=(10, 20, 30), size=16, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)


def make_folder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    for s, (split, classes) in enumerate(splits.items()):
        for c, (cls, n) in enumerate(classes.items()):
            for i in range(n):
                write_image(root / split / cls / f"{i:03d}.png", (40 * c, 10 * i, 50 * s))
    return root


def load(spec, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_data(str(spec), train_transform=None, eval_transform=None, **kw)


def error_of(fn, *args, **kw) -> VistuneError:
    with pytest.raises(VistuneError) as info:
        fn(*args, **kw)
    return info.value


def make_seg_folder(root: Path, n: int) -> None:
    """root/images/<i>.png with grey index masks root/masks/<i>.png (labels 0 and 1), no val split."""
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        write_image(root / "images" / f"{i}.png")
        Image.fromarray(np.full((16, 16), i % 2, np.uint8), "L").save(root / "masks" / f"{i}.png")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height (PIL's open reads only the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------- each image read once
def test_a_symlink_loop_in_a_class_folder_reads_each_image_once(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {c: 16 for c in CLASSES}, "val": {c: 2 for c in CLASSES}})
    (root / "train" / "cat" / "again").symlink_to(root / "train" / "cat", target_is_directory=True)
    (root / "train" / "dog" / "sub").mkdir()
    (root / "train" / "dog" / "sub" / "back").symlink_to(root / "train" / "dog", target_is_directory=True)
    with pytest.warns(DataWarning, match="read once") as record:
        d = load_data(str(root), train_transform=None, eval_transform=None)
    assert len(d.train) == 48 and list(np.bincount(d.train.labels)) == [16, 16, 16]
    assert len(set(d.train.paths)) == 48 and not any("again" in p or "back" in p for p in d.train.paths)
    assert any("read once" in w for w in d.warnings) and len(record) == len(d.warnings)


def test_links_to_outside_images_count_once_and_one_file_in_two_classes_is_an_error(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {c: 3 for c in CLASSES}})
    outside = tmp_path / "elsewhere"
    write_image(outside / "extra.png", (200, 0, 0))
    (root / "train" / "cat" / "extra.png").symlink_to(outside / "extra.png")
    (root / "train" / "cat" / "extra-again.png").symlink_to(outside / "extra.png")
    os.link(root / "train" / "cat" / "000.png", root / "train" / "cat" / "hardlink.png")
    (root / "train" / "cat" / "more").symlink_to(outside, target_is_directory=True)  # a folder outside: fine too
    d = load(root, val_size=3)
    paths = sorted(d.train.paths + d.val.paths)
    assert len(paths) == 10 and list(np.bincount(np.concatenate([d.train.labels, d.val.labels]))) == [4, 3, 3]
    assert str(root / "train" / "cat" / "extra-again.png") in paths  # the first path in sorted order is kept

    (root / "train" / "dog" / "a-cat.png").symlink_to(root / "train" / "cat" / "001.png")
    e = error_of(load, root)
    assert "two class folders" in e.what and "001.png" in e.what and "a-cat.png" in e.what and "one class" in e.fix


def test_a_broken_symlink_in_a_class_folder_is_an_error(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {c: 3 for c in CLASSES}})
    (root / "train" / "fox" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    e = error_of(load, root)
    assert "gone.png" in e.what and str(root / "train" / "fox") in e.what and "do not exist" in e.what


def test_a_file_in_two_splits_or_twice_in_a_list_is_a_warning(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {c: 4 for c in CLASSES}, "test": {c: 2 for c in CLASSES}})
    (root / "train" / "cat" / "leak.png").symlink_to(root / "test" / "cat" / "000.png")
    d = load(root)
    assert any(w.startswith("test and train share 1 image file(s)") and "trains on" in w for w in d.warnings)

    lists = tmp_path / "lists"
    for i in range(6):
        write_image(lists / "images" / f"{i}.png", (i * 30, 0, 0))
    lines = "".join(f"images/{i}.png {i % 2}\n" for i in range(6))
    (lists / "train800.txt").write_text(lines + "images/0.png 0\n")  # line 7 repeats line 1
    (lists / "val200.txt").write_text("images/./1.png 1\n")  # the same file as train's line 2
    d = load(lists)
    assert any(w.startswith("train holds 1 image file(s) more than once") for w in d.warnings)
    assert any(w.startswith("val and train share 1 image file(s)") for w in d.warnings)


# ----------------------------------------------------------------------------- list paths stay inside
def test_list_paths_outside_the_folder_are_refused(tmp_path):
    root = tmp_path / "vtab"
    for i in range(4):
        write_image(root / "images" / f"{i}.png")
    write_image(tmp_path / "secret.png")
    ok = "".join(f"images/{i}.png {i % 2}\n" for i in range(4))
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "images/../../secret.png"):
        (root / "train800.txt").write_text(ok + f"{bad} 1\n")
        e = error_of(load, root)
        assert str(root / "train800.txt") in e.what and "line 5" in e.what and repr(bad) in e.what
        assert "inside" in e.what and "symbolic link" in e.fix and str(root) in e.fix
    # '..' that stays inside the folder is fine, and so is a symbolic link inside it to images elsewhere
    (root / "shared").symlink_to(tmp_path, target_is_directory=True)
    (root / "train800.txt").write_text(ok + "images/../images/0.png 0\nshared/secret.png 1\n")
    d = load(root)
    assert len(d.train) + len(d.val) == 6


# ----------------------------------------------------------------------- classes a split lacks, counts
def test_a_val_or_test_split_lacking_a_train_class_warns_with_per_class_counts(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {"cat": 5, "dog": 4, "fox": 3}, "val": {"cat": 2, "dog": 1},
                                         "test": {"cat": 1, "dog": 1, "fox": 1}})
    with pytest.warns(DataWarning, match="val has no images of 1 of the 3 classes") as record:
        d = load_data(str(root), train_transform=None, eval_transform=None)
    assert str(record[0].message) == d.warnings[0] and record[0].filename == __file__  # names the caller
    assert d.warnings == ["val has no images of 1 of the 3 classes train has (fox): model selection on val never "
                          "sees them; per-class images train/val: cat 5/2, dog 4/1, fox 3/0"]
    assert {k: list(v) for k, v in d.class_counts().items()} == {"train": [5, 4, 3], "val": [2, 1, 0],
                                                                 "test": [1, 1, 1]}
    assert d.counts_table().splitlines() == ["class   train     val    test", "cat         5       2       1",
                                             "dog         4       1       1", "fox         3       0       1",
                                             "total      12       3       3"]


def test_train_lacking_a_class_that_test_holds_warns(tmp_path):
    root = tmp_path / "vtab"
    entries = {"train800.txt": [(f"images/tr{i}.png", i % 2) for i in range(6)],
               "test.txt": [(f"images/te{i}.png", i % 3) for i in range(6)]}
    for name, rows in entries.items():
        for rel, label in rows:
            write_image(root / rel, (label * 60, 0, 0))
        (root / name).write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    (root / "classes.txt").write_text("a\nb\nc\n")
    d = load(root, val_size=2)
    assert any(w.startswith("train has no images of 1 class(es) that val/test hold (c)") and "cannot learn" in w
               for w in d.warnings)


def test_many_classes_list_only_the_ones_missing(tmp_path):
    classes = {f"c{k:02d}": 2 for k in range(30)}
    root = make_folder(tmp_path / "ds", {"train": classes, "test": {"c00": 1}})
    d = load(root, val_size=30)
    (test_warning,) = [w for w in d.warnings if w.startswith("test")]
    assert "29 of the 30 classes" in test_warning and test_warning.endswith(", … (29 in all)")
    assert "c00 " not in test_warning.split("per-class images train/test: ")[1]  # only the missing are listed


# ----------------------------------------------------------------------------- the val carve and seed
def test_carved_val_is_announced_and_follows_data_seed_not_seed(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {c: 10 for c in CLASSES}})
    d = load(root)
    assert d.val_from_train and d.data_seed == 0
    assert d.val_note == (f"no {root / 'val'} folder: 20% of train (6 of 30 images, stratified, data seed 0) "
                          "is used for validation")
    assert load(root, data_seed=0).val.paths == d.val.paths
    other = load(root, data_seed=1)
    assert other.val.paths != d.val.paths and other.data_seed == 1 and "data seed 1" in other.val_note
    # `seed` is data_seed's older name: honoured alone, overruled by data_seed
    assert load(root, seed=1).val.paths == other.val.paths
    assert load(root, seed=7, data_seed=0).val.paths == d.val.paths
    sized = load(root, val_size=9, train_size=12, data_seed=2)
    assert sized.val_note == (f"no {root / 'val'} folder: 9 of train's 30 images (val_size, stratified, "
                              "data seed 2) are used for validation")
    assert load(root, val_size=9, train_size=12, data_seed=2).train.paths == sized.train.paths
    assert "non-negative" in error_of(load, root, data_seed=-1).what
    given = make_folder(tmp_path / "given", {"train": {c: 3 for c in CLASSES}, "val": {c: 1 for c in CLASSES}})
    assert load(given).val_note == "" and not load(given).val_from_train


def test_carved_val_of_a_list_folder_and_a_builtin_is_announced(tmp_path):
    root = tmp_path / "vtab"
    rows = [(f"images/{i}.png", i % 2) for i in range(10)]
    for rel, label in rows:
        write_image(root / rel, (label * 60, 0, 0))
    (root / "train800val200.txt").write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    assert load(root).val_note.startswith(f"no {root / 'val200.txt'}: 20% of train (2 of 10 images")
    assert load("digits").val_note.startswith("digits has no val split: 20% of train (")


def test_segmentation_carve_uses_data_seed_and_says_so(tmp_path):
    make_seg_folder(tmp_path, 10)
    d = load_segmentation_data(str(tmp_path), train_transform=None, eval_transform=None)
    assert d.val_note == (f"{tmp_path} has no val split: 20% of train (2 of 10 images, random, data seed 0) "
                          "is used for validation") and d.data_seed == 0
    again = load_segmentation_data(str(tmp_path), train_transform=None, eval_transform=None, seed=3)
    assert again.data_seed == 3 and list(again.val.indices) == list(
        load_segmentation_data(str(tmp_path), train_transform=None, eval_transform=None, data_seed=3).val.indices)


# --------------------------------------------------------------------------------------- huge images
def test_a_decompression_bomb_is_named_as_such_not_truncated(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_header(14000, 14000))  # 196 MP: above twice PIL's default limit
    e = error_of(load_image, big)
    assert "truncated" not in e.what and "too large" in e.what and str(big) in e.what
    assert "196,000,000 pixels" in e.what and "89,478,485" in e.what
    assert "downscale" in e.fix and "VISTUNE_MAX_IMAGE_PIXELS=196000000" in e.fix


def test_images_between_one_and_two_times_the_limit_are_refused_too(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    write_image(tmp_path / "warn.png", size=40)  # 1,600 pixels: PIL only warns, and would decode
    write_image(tmp_path / "ok.png", size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither PIL's DecompressionBombWarning nor any other escapes
        e = error_of(load_image, tmp_path / "warn.png")
        assert load_image(tmp_path / "ok.png").size == (30, 30)
    assert "40×40 = 1,600 pixels" in e.what and "limit of 1,000 pixels" in e.what


def test_the_pixel_limit_can_be_raised_or_lowered_by_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    write_image(tmp_path / "img.png", size=50)  # 2,500 pixels: above twice PIL's limit
    monkeypatch.setenv("VISTUNE_MAX_IMAGE_PIXELS", "3000")
    assert load_image(tmp_path / "img.png").size == (50, 50)
    monkeypatch.setenv("VISTUNE_MAX_IMAGE_PIXELS", "2_000")
    assert "limit of 2,000 pixels" in error_of(load_image, tmp_path / "img.png").what
    monkeypatch.setenv("VISTUNE_MAX_IMAGE_PIXELS", "lots")
    assert "VISTUNE_MAX_IMAGE_PIXELS='lots'" in error_of(load_image, tmp_path / "img.png").what


# ------------------------------------------------------------------------------------ the decode check
def test_verify_decodable_reports_every_bad_file_of_every_split_at_once(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {c: 4 for c in CLASSES}, "val": {c: 1 for c in CLASSES},
                                         "test": {c: 2 for c in CLASSES}})
    good = load(root)
    seen = []
    assert verify_decodable(good, progress=lambda done, total: seen.append((done, total))) == 21
    assert seen[-1] == (21, 21) and len(seen) == 21
    (root / "train" / "dog" / "001.png").write_bytes(b"not an image")
    for name in ("000.png", "001.png"):
        (root / "test" / "fox" / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "test" / "cat" / "000.png").write_bytes(png_header(14000, 14000))
    e = error_of(verify_decodable, good)
    assert e.what.startswith(f"4 of the 21 image files of {root} cannot be used (train: 1, test: 3):")
    for bad in ("train/dog/001.png", "test/fox/000.png", "test/fox/001.png"):
        assert str(root / bad) in e.what
    assert "too large" in e.what and "[test]" in e.what and "[train]" in e.what
    short = error_of(verify_decodable, good, max_listed=2)
    assert short.what.count("\n  [") == 2 and short.what.endswith("… and 2 more")


def test_verify_decodable_full_finds_what_the_header_check_cannot(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {c: 2 for c in CLASSES}, "test": {"cat": 1}})
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = root / "test" / "cat" / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header survives, the data does not
    d = load(root)
    assert verify_decodable(d) == 8
    e = error_of(verify_decodable, d, full=True)
    assert "1 of the 8 image files" in e.what and str(cut) in e.what


def test_verify_decodable_skips_in_memory_sets_and_checks_segmentation_masks(tmp_path):
    assert verify_decodable(load("digits")) == 0
    make_seg_folder(tmp_path, 5)
    seg = load_segmentation_data(str(tmp_path), train_transform=None, eval_transform=None)
    assert verify_decodable(seg) == 10
    Image.new("RGB", (16, 16)).save(tmp_path / "masks" / "3.png")  # an RGB picture, not an index mask
    e = error_of(verify_decodable, seg)
    assert str(tmp_path / "masks" / "3.png") in e.what and "RGB" in e.what


# ---------------------------------------------------------------------------------------- import graph
def _data_imports() -> dict[str, set[str]]:
    """vistune.data module → the vistune modules it imports (module-level and inside functions)."""
    graph = {}
    for path in DATA_PKG.glob("*.py"):
        name = "vistune.data" if path.stem == "__init__" else f"vistune.data.{path.stem}"
        package = "vistune.data".split(".")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found |= {module} | {f"{module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m.startswith("vistune")}
    return graph


def test_the_data_package_has_no_import_cycle_and_imports_no_higher_layer():
    graph = _data_imports()
    modules = set(graph)
    edges = {m: {t for t in targets if t in modules and t != m and m != "vistune.data"} for m, targets in
             graph.items()}
    state: dict[str, int] = {}

    def visit(m, trail):
        assert state.get(m) != 1, f"import cycle: {' -> '.join(trail + [m])}"
        if state.get(m) is None:
            state[m] = 1
            for t in sorted(edges[m]):
                visit(t, trail + [m])
            state[m] = 2

    for m in sorted(modules):
        visit(m, [])
    higher = ("vistune.methods", "vistune.artifacts", "vistune.training", "vistune.run", "vistune.bench",
              "vistune.cli")
    assert not {(m, t) for m, ts in graph.items() for t in ts if t.startswith(higher)}
    assert "vistune.data.loading" not in graph["vistune.data.builtin"] | graph["vistune.data.datasets"]
