"""The generated structured tasks: deterministic, and their labels are true of their images."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from vistune.data import load_data
from vistune.data import synthetic


def test_generation_is_deterministic():
    first = synthetic.generate("shapes-ori")
    synthetic.generate.cache_clear()
    second = synthetic.generate("shapes-ori")
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_clevr_count_labels_count_the_objects():
    x, y, _, _ = synthetic.generate("clevr-count")
    for img, label in zip(x[:200], y[:200]):
        objects = np.any(img != 118, axis=-1)
        _, n = ndimage.label(objects)
        assert n == label + 3


def test_shapes_loc_label_is_the_x_bin_of_the_sprite():
    x, y, _, _ = synthetic.generate("shapes-loc")
    for img, label in zip(x[:200], y[:200]):
        cols = np.nonzero(img > 127)[1]
        centre = (cols.min() + cols.max()) / 2
        # the bin was computed from the true centre; the drawn extent agrees within a pixel
        assert abs(centre / synthetic.SIZE * 8 - (label + 0.5)) < 1.0 + 8 / synthetic.SIZE * 10


def test_builtin_names_load_with_vtab_protocol():
    for name in ("shapes-loc", "shapes-ori", "clevr-count"):
        d = load_data(name, train_transform=None, eval_transform=None, train_size=800, val_size=200)
        assert (len(d.train), len(d.val), len(d.test)) == (800, 200, 1000)
        assert len(d.class_names) == 8
        assert set(np.unique(d.train.labels)) == set(range(8))
