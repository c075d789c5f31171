"""Wall time of reading a folder data set (``load_data``) and of checking its files (``verify_decodable``).

Writes ``--images`` small images (``--size`` px, half PNG half JPEG, 10 classes, 80% train / 20% test) into a
temporary folder, then times, best of ``--repeats``: load_data (the folder walk, the per-file stat of the
link and overlap checks), verify_decodable's header check, and its full decode (``full=True``). The first
pass over the files warms the OS cache, so the times are of cached files. Example (its docstring's figures):
  python benchmarks/verify_data.py --images 3000 --size 64
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from vistune.data import DataWarning, load_data, verify_decodable


def write_folder(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        split = "test" if (i // 10) % 5 == 0 else "train"
        path = root / split / f"class{i % 10}" / f"{i:05d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore", DataWarning)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root, args.images, args.size)

        def load():
            return load_data(str(root), train_transform=None, eval_transform=None)

        splits = load()
        verify_decodable(splits, full=True)  # warm the OS file cache
        rows = [("load_data", best_of(args.repeats, load)),
                ("verify_decodable (headers)", best_of(args.repeats, lambda: verify_decodable(splits))),
                ("verify_decodable (full=True)", best_of(args.repeats, lambda: verify_decodable(splits, full=True)))]
    print(f"{args.images} images of {args.size}×{args.size} (half PNG, half JPEG); {platform.processor() or '?'}, "
          f"Python {platform.python_version()}; best of {args.repeats}")
    print(f"{'step':<30} {'seconds':>8} {'ms / file':>10}")
    for name, seconds in rows:
        print(f"{name:<30} {seconds:>8.3f} {1000 * seconds / args.images:>10.3f}")


if __name__ == "__main__":
    main()
