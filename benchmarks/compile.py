"""Is torch.compile worth it for vistune's training step? Eager vs compiled, per method, side by side.

For each method: two copies of the same adapted model (same init), one eager and one ``torch.compile``d (the
model's forward; AOTAutograd compiles its backward; the SGD step stays eager). Both train the same seeded
batches; the table gives the compile time (the first compiled step), the steady-state step time of each (median
over paired rounds, the CPU clock as in benchmarks/efficiency.py), their ratio, and the largest relative
difference of the losses over the steps (the target for adopting it: ≥ 1.2× faster, losses equal to 1e-5).

  OMP_WAIT_POLICY=PASSIVE python benchmarks/compile.py --backbone vistune/vit-tiny-cifar10 --image-size 32 \
      --batch-size 32 --threads 2 --steps 10 --warmup 2 --methods full,bias,lora,ssf,vpt-deep,adapter
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

import _harness
from _harness import NUM_CLASSES, method_config, split_methods


def main():
    p = _harness.parser(__doc__, "full,bias,lora,ssf,vpt-deep,adapter", "comma list, options after a colon")
    p.add_argument("--mode", default="default", help="torch.compile mode")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vistune.methods import adapt, make_config

    device, backbone, x, y = _harness.child_inputs(args)
    batches = [(torch.randn_like(x), torch.randint_like(y, NUM_CLASSES)) for _ in range(args.warmup + args.steps)]
    load = os.getloadavg()
    print(f"command: python benchmarks/compile.py {' '.join(sys.argv[1:])}\n{_harness.machine(args)}; load "
          f"{load[0]:.1f}; torch.compile mode={args.mode}\n")
    print("| method | compile (s) | eager step (ms) | compiled step (ms) | eager / compiled | max loss rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in split_methods(args.methods):
        name, sets = method_config(spec)
        models, optims = {}, {}
        for kind in ("eager", "compiled"):
            torch.manual_seed(0)
            model = adapt(backbone, make_config(name, sets, image_size=args.image_size), NUM_CLASSES).to(device)
            models[kind] = torch.compile(model, mode=args.mode) if kind == "compiled" else model
            optims[kind] = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3,
                                           momentum=0.9)
        losses = {"eager": [], "compiled": []}
        times = {"eager": [], "compiled": []}
        compile_s = 0.0
        for i, (xb, yb) in enumerate(batches):
            for kind in ("eager", "compiled"):
                torch.manual_seed(i)  # the same dropout masks
                t0, c0 = time.perf_counter(), time.process_time()
                models[kind].train()
                loss = F.cross_entropy(models[kind](xb).float(), yb)
                optims[kind].zero_grad(set_to_none=True)
                loss.backward()
                optims[kind].step()
                cpu = time.process_time() - c0
                if kind == "compiled" and i == 0:
                    compile_s = time.perf_counter() - t0
                losses[kind].append(loss.item())
                if i >= args.warmup:
                    times[kind].append(cpu)
        ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]
        diff = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"]))
        print(f"| {spec} | {compile_s:.0f} | {1000 * statistics.median(times['eager']):.0f} | "
              f"{1000 * statistics.median(times['compiled']):.0f} | {statistics.median(ratios):.2f}× | {diff:.1e} |",
              flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
