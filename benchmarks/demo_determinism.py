"""Do the demo's figures depend on the process's thread settings? Runs the demo's code (real ImageNet
EfficientNet-Lite0 on Fashion-MNIST, `--quick` settings) on fewer images three times — under OMP_NUM_THREADS=1,
under OMP_NUM_THREADS=2, and with the demo's own thread count set to 1 — each in a fresh process, and prints
whether the trained tensors are bit-identical.

    python benchmarks/demo_determinism.py [--out DIR] [--methods adapter,partial-1]

Takes about 15 min per run on 2 shared cores under heavy load (2026-12-01); far less on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys
import vistune.demo as d
out, threads, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
d.DEMO_METHODS = [m for m in d.DEMO_METHODS if m[0] in methods]
d.demo_data = lambda quick: ("fashion-mnist", {"train_size": 160, "val_size": 40, "test_size": 100})
d.reproducible.__defaults__ = (threads,)
d.run_demo(out=out, quick=True, device="cpu", progress=False)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the three runs (default: a temporary one)")
    parser.add_argument("--methods", default="adapter,partial-1", help="demo methods to run")
    args = parser.parse_args()
    from safetensors.torch import load_file

    out = Path(args.out or tempfile.mkdtemp(prefix="vistune-determinism-"))
    runs = {"OMP_NUM_THREADS=1": ("1", 2), "OMP_NUM_THREADS=2": ("2", 2), "demo on 1 thread": ("2", 1)}
    for k, (name, (omp, threads)) in enumerate(runs.items()):
        env = {**os.environ, "OMP_NUM_THREADS": omp, "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", CHILD, str(out / f"run{k}"), str(threads), args.methods], env=env,
                       check=True)
    print(f"| method | {' | '.join(list(runs)[1:])} (vs {list(runs)[0]}) |")
    print("|---|" + "---|" * (len(runs) - 1))
    for method in args.methods.split(","):
        tensors = [load_file(out / f"run{k}" / method / "adapter.safetensors") for k in range(len(runs))]
        cells = []
        for other in tensors[1:]:
            diff = max(float((tensors[0][n].float() - other[n].float()).abs().max()) for n in tensors[0])
            cells.append("bit-identical" if diff == 0 else f"max |diff| {diff:.3g}")
        print(f"| {method} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
