"""Shared fixtures: tiny random-weight stock timm models of every family (no download)."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# the output tests assume no terminal size in the environment (a pytest-xdist worker has COLUMNS=80 and
# LINES=24); a test that wants one sets it with monkeypatch
for _var in ("COLUMNS", "LINES"):
    os.environ.pop(_var, None)


def thread_share(threads: int) -> int:
    """This process's share of ``threads`` torch threads: under pytest-xdist (scripts/test.sh runs one worker per
    core) each worker gets its share, as more threads than cores slow every worker down."""
    return max(1, threads // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


torch.set_num_threads(thread_share(min(2, torch.get_num_threads())))

from vistune.backbones import load_backbone  # noqa: E402

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "vit_reg_avg": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                 reg_tokens=2, class_token=False, global_pool="avg")),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                              num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                 depths=(1, 1), num_heads=(1, 2))),
    "efficientnet": ("tf_efficientnet_lite0", dict()),
    "resnet": ("resnet10t", dict()),
    "convnext": ("convnext_atto", dict()),
    "mobilenet": ("mobilenetv2_050", dict()),
}
IMAGE_SIZE = 32


def tiny_backbone(kind: str):
    arch, kwargs = TINY[kind]
    return load_backbone(arch, random_init=True, model_kwargs=kwargs)


def pytest_collection_modifyitems(items):
    """Files with a ``long_running`` test first (a stable sort: the order within and among the others stays).
    pytest-xdist's --dist loadfile hands out files in this order, so the longest one does not start last."""
    long_files = {item.path for item in items if item.get_closest_marker("long_running")}
    items.sort(key=lambda item: item.path not in long_files)


@pytest.fixture(scope="session")
def tiny_backbones():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = tiny_backbone(kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def vit_b16():
    """A ViT-B/16-shaped model with random weights, for exact parameter-count formulas."""
    return load_backbone("vit_base_patch16_224", random_init=True)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to ``n`` for the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the cores are shared."""
    with torch_threads(1):
        yield


def tinted_class_folder(root, n_train: int, n_test: int, seed: int, size: int = IMAGE_SIZE):
    """root/{train,test}/class{0,1,2}/<i>.png: noisy images whose class tints one colour channel."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 160, (size, size, 3)).astype(np.uint8)
                a[..., c] += 90
                Image.fromarray(a).save(d / f"{i}.png")
    return root
