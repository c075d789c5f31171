"""Decoded, transformed images shared by the runs of one task × phase of a sweep (deterministic pipelines only)."""
from __future__ import annotations

from ..training.trainer import InMemory

CACHE_LIMIT_BYTES = 2 * 2**30  # keep decoded train/val tensors in memory across runs below this size


class SharedCache(InMemory):
    """Decoded, transformed images kept across the runs of a phase; otherwise behaves as the wrapped dataset."""

    def with_transform(self, transform):
        return self.dataset.with_transform(transform)

    def __getattr__(self, name):  # only for attributes the cache lacks (subset, paths, …)
        if name.startswith("__") or name in ("dataset", "items", "labels"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def maybe_cache(ds, image_size: int, augment: bool):
    """``ds`` wrapped in a :class:`SharedCache`, unless its images are augmented (they differ every epoch)
    or decoded they would exceed :data:`CACHE_LIMIT_BYTES`."""
    if augment or ds is None or len(ds) * 3 * image_size * image_size * 4 > CACHE_LIMIT_BYTES:
        return ds
    return SharedCache(ds)
