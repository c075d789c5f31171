"""The whole efficiency table of vistune's methods on one backbone, every ratio measured side by side.

Rows (one adapted model each, all built in this one process and measured in turns):
  floor            the frozen floor: forward + backward to the input of the bare backbone, no weight gradient;
                   what any method that back-propagates through the whole trunk pays at least
  timm: full       a bare timm loop: the stock timm model with its classifier, every parameter trained (SGD)
  peft: lora       peft.get_peft_model on the stock timm model (LoRA r=8 on the fused qkv Linear; ViT/Swin)
  <method>         vistune's training step of the method: forward, cross-entropy, backward, SGD-momentum step
  <method> +gc     the same with --grad-checkpoint (every method that back-propagates through the trunk)

Columns:
  step / floor, / full, / bare   median over rounds of the *paired* ratio: in every round each row runs one step
                   in turn (the order rotates from round to round), and a row's ratio is taken against the
                   floor's (vistune full's; its bare counterpart's: full → timm: full, lora → peft: lora)
                   step *of the same round*, so that load from other processes hits both sides alike
  token ratio      (prompt methods on a ViT) tokens entering block 1 / the bare backbone's (N + p) / N; the
                   target for a prompt method is ≤ 1.05 × floor × token ratio
  saved / full     bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``, distinct
                   storages, not counting parameters or the input batch), against vistune full's
  peak / full      the training process's peak memory (CPU: VmHWM, CUDA: max allocated) over its memory after the
                   imports, in a fresh child process per row that builds the backbone and the row and runs one step
                   (the optimizer's momentum buffers created first, so that it is a steady-state step); the
                   children run one after another while this process times the rows (with the CPU clock, their
                   load does not change this process's CPU time, only its wall time)
  infer b1, bN     eval-mode latency without gradients, / the bare timm model (with classifier), and for prompt
                   methods / the token floor (bare × token ratio); merged bN: ``vistune.merge`` of the trained
                   method / bare, paired (one merged model at a time, in turns with the bare one; a merged model
                   is the stock model: the target is 1.00×)

Clock: on a CPU the default is the process CPU time of each call (``time.process_time``, all torch threads
together; set OMP_WAIT_POLICY=PASSIVE so that threads waiting at a barrier sleep instead of spinning), which
measures the work even when other processes share the cores; ``--clock wall`` for wall time. On CUDA it is wall
time after a synchronize.

Examples (docs/benchmarks.md):
  OMP_WAIT_POLICY=PASSIVE python benchmarks/efficiency.py --backbone vit_base_patch16_224 --random-init \
      --image-size 224 --batch-size 8 --threads 2 --steps 3 --warmup 1
  OMP_WAIT_POLICY=PASSIVE python benchmarks/efficiency.py --backbone vistune/vit-tiny-cifar10 --image-size 32 \
      --batch-size 32 --threads 2 --steps 7 --warmup 2
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import _harness
from _harness import NUM_CLASSES, autocast, method_config, split_methods

DEFAULT_METHODS = ("linear,full,bias,adapter,sct,lora,ssf,pro-tuning,vpt-shallow:num_tokens=50,"
                   "vpt-deep:num_tokens=50,pgn")
GC = " +gc"


@dataclass
class Row:
    name: str
    loss: Callable[[], torch.Tensor]  # one forward to the loss (train mode)
    optimizer: torch.optim.Optimizer | None
    module: nn.Module
    tuned_params: int
    infer: Callable[[torch.Tensor], torch.Tensor] | None = None  # eval mode, no gradients
    mergeable: bool = False
    counterpart: str | None = None  # the bare row it is compared with
    token_ratio: float | None = None
    recompute: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # +gc rows: checkpointing
    stats: dict = field(default_factory=dict)

    def step(self) -> None:
        with self.recompute():
            loss = self.loss()
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.optimizer is not None:
                self.optimizer.step()


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-3, momentum=0.9)


def block_tokens(model: nn.Module, blocks: nn.Module, x: torch.Tensor) -> int:
    """Length of the token sequence entering ``blocks[0]`` when ``model(x)`` runs (in eval mode: a batch of one
    cannot pass a BatchNorm in train mode, e.g. PGN's generator, and no running statistics may change)."""
    seen = []
    handle = blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]


def build_rows(args, backbone, x, y, names: list[str], inference: bool = True) -> dict[str, Row]:
    """The rows ``names`` on ``backbone``; with ``inference``, their inference and token ratios too.

    A ``+gc`` row trains the same model as the row without it (when both are built), with checkpointing on
    during its own steps only, so that no model is held twice."""
    from vistune.methods import METHODS, TokenTuner, adapt, count_parameters, make_config
    from vistune.training.recompute import activation_checkpointing

    device, amp = x.device, autocast(x.device)
    backbone.to(device)
    rows: dict[str, Row] = {}
    stock: list[nn.Module] = []

    def bare() -> nn.Module:
        """The stock timm model with a classifier (built once, when a row needs it)."""
        if not stock:
            model = copy.deepcopy(backbone.model)
            model.reset_classifier(NUM_CLASSES)
            stock.append(model.requires_grad_(True).to(device))
        return stock[0]

    def ce(model):
        def loss():
            model.train()
            with amp:
                return F.cross_entropy(model(x).float(), y)
        return loss

    def infer(model):
        def run(batch):
            model.eval()
            with torch.no_grad(), amp:
                return model(batch)
        return run

    for name in names:
        if name == "floor":
            def floor_loss():
                xi = x.detach().requires_grad_(True)
                with amp:
                    return backbone.forward_features(xi).float().sum()
            rows[name] = Row(name, floor_loss, None, backbone.model, 0, infer=infer(bare()) if inference else None)
        elif name == "timm: full":
            rows[name] = Row(name, ce(bare()), sgd(bare().parameters()), bare(),
                             sum(p.numel() for p in bare().parameters()))
        elif name == "peft: lora":
            import peft

            frozen = copy.deepcopy(bare()).requires_grad_(False)
            classifier = frozen.default_cfg.get("classifier", "head")
            lora = peft.get_peft_model(frozen, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"],
                                                               modules_to_save=[classifier])).to(device)
            rows[name] = Row(name, ce(lora), sgd(lora.parameters()), lora,
                             sum(p.numel() for p in lora.parameters() if p.requires_grad))
        else:
            spec, checkpointed = name.removesuffix(GC), name.endswith(GC)
            method, sets = method_config(spec)
            counterpart = {"full": "timm: full", "lora": "peft: lora"}.get(spec)
            if checkpointed and spec in rows:
                base = rows[spec]
                model, optimizer = base.module, base.optimizer
            else:
                torch.manual_seed(0)
                model = adapt(backbone, make_config(method, sets, image_size=args.image_size), NUM_CLASSES)
                model.prepare(TensorDataset(x.cpu(), y.cpu()), device=device, batch_size=len(x), progress=False)
                model.to(device)
                optimizer = sgd(model.parameters())
            row = Row(name, ce(model), optimizer, model, count_parameters(model)["tuned_params"],
                      counterpart=counterpart)
            if checkpointed:
                row.recompute = lambda model=model: activation_checkpointing(model, True)
            elif inference:
                row.infer = infer(model)
                row.mergeable = METHODS[method].method_class.mergeable
                if isinstance(model, TokenTuner) and backbone.family == "vit":
                    row.token_ratio = (block_tokens(model, model.backbone.model.blocks, x[:1])
                                       / block_tokens(bare(), bare().blocks, x[:1]))
            rows[name] = row
    return rows


def row_names(args, backbone) -> list[str]:
    from vistune.methods import METHODS

    methods = split_methods(args.methods)
    names = ["floor", "timm: full"] + (["peft: lora"] if backbone.family in ("vit", "swin") else []) + methods
    wanted = methods if args.grad_checkpoint == "all" else \
        [] if args.grad_checkpoint == "none" else split_methods(args.grad_checkpoint)
    through_trunk = [m for m in wanted if not METHODS[method_config(m)[0]].method_class.head_only]
    return names + [m + GC for m in through_trunk]


# ---- measuring ----------------------------------------------------------------------------------
def clock(args, device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call: process CPU time (CPU default) or wall time after a CUDA synchronize."""
    use_cpu = (args.clock or ("wall" if device.type == "cuda" else "cpu")) == "cpu"

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.process_time() if use_cpu else time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.process_time() if use_cpu else time.perf_counter()) - t0

    return timed


def saved_bytes(loss: Callable[[], torch.Tensor], exclude: set[int]) -> tuple[torch.Tensor, int]:
    """(the loss, bytes of the distinct storages autograd saved for its backward, minus those in ``exclude``)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    return value, sum(storages.values())


def rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


def measure_in_process(args, rows: dict[str, Row], x: torch.Tensor, progress: Callable[[str], None]) -> None:
    from vistune.merge import merge

    timed = clock(args, x.device)
    exclude = {x.untyped_storage().data_ptr()}
    for row in rows.values():
        exclude |= {p.untyped_storage().data_ptr() for p in row.module.parameters()}
    warmed: set[int] = set()
    for row in rows.values():  # warm-up (once per model); the first forward also counts the saved bytes
        with row.recompute():
            loss, row.stats["saved_bytes"] = saved_bytes(row.loss, exclude)
            if id(row.module) in warmed:
                del loss  # a +gc row of a model already warmed up: the count was all it needed
                continue
            if row.optimizer is not None:
                row.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if row.optimizer is not None:
                row.optimizer.step()
        for _ in range(args.warmup - 1):
            row.step()
        warmed.add(id(row.module))
        progress(f"warm-up {row.name}")
    names = list(rows)
    steps = {n: [] for n in names}
    for r in range(args.steps):
        for name in rotated(names, r):
            steps[name].append(timed(rows[name].step))
        progress(f"train round {r + 1}/{args.steps}")
        dump(args, rows, steps=steps)
    infer_rows = [n for n in names if rows[n].infer is not None]
    infer = {(n, b): [] for n in infer_rows for b in ("b1", "bN")}
    for r in range(args.steps + 1):  # the first round warms up
        for name in rotated(infer_rows, r):
            for b, batch in (("b1", x[:1]), ("bN", x)):
                t = timed(lambda: rows[name].infer(batch))
                if r:
                    infer[(name, b)].append(t)
        progress(f"inference round {r + 1}/{args.steps + 1}")
    merged: dict[str, list[tuple[float, float]]] = {}
    for name in [n for n in names if rows[n].mergeable]:  # one merged model at a time, paired with the bare one
        model = merge(rows[name].module).to(x.device)
        merged[name] = []
        for r in range(args.steps + 1):
            pair = (timed(lambda: rows["floor"].infer(x)), timed(lambda: _eval(model, x)))
            if r:
                merged[name].append(pair)
        del model
        progress(f"merged {name}")
    for name in names:
        rows[name].stats.update(steps=steps[name], infer={b: infer.get((name, b)) for b in ("b1", "bN")},
                                merged_vs_bare=merged.get(name))


def dump(args, rows: dict[str, Row], **partial) -> None:
    """What is measured so far, to --json (a long run on a loaded machine keeps its rounds)."""
    if args.json:
        with open(args.json + ".partial", "w") as f:
            json.dump({"saved_bytes": {n: r.stats.get("saved_bytes") for n, r in rows.items()}, **partial}, f)


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), autocast(x.device):
        return model(x)


def status_kib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_child(args) -> dict:
    """Child mode: the training peak memory of one row (over the process's memory after the imports)."""
    import peft  # noqa: F401 (every child imports the same: the baseline is the same for every row)
    import timm  # noqa: F401

    import vistune.merge  # noqa: F401

    device = torch.device(args.device)
    baseline = status_kib("VmRSS") / 1024 if device.type == "cpu" else 0.0
    _, backbone, x, y = _harness.child_inputs(args)
    row = build_rows(args, backbone, x, y, [args.peak_row], inference=False)[args.peak_row]
    if row.optimizer is not None:  # SGD's momentum buffers, as every step after the first has them
        for group in row.optimizer.param_groups:
            for p in group["params"]:
                row.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    if device.type == "cuda":  # everything allocated counts, the weights too (as in the CPU's resident memory)
        torch.cuda.reset_peak_memory_stats(device)
        row.step()
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "baseline_mb": baseline}
    row.step()
    return {"peak_mb": status_kib("VmHWM") / 1024 - baseline, "baseline_mb": baseline}


def measure_peaks(args, names: list[str], progress: Callable[[str], None]) -> dict[str, dict]:
    out = {}
    for name in names:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--peak-row", name], capture_output=True,
                             text=True, env=env)
        if res.returncode:
            progress(f"peak {name}: failed\n{res.stderr[-2000:]}")
            continue
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        progress(f"peak {name}: {out[name]['peak_mb']:.0f} MiB")
    return out


# ---- the table ----------------------------------------------------------------------------------
def paired(rows: dict[str, Row], name: str, ref: str | None) -> float | None:
    if ref is None or ref not in rows:
        return None
    a, b = rows[name].stats["steps"], rows[ref].stats["steps"]
    return statistics.median(x / y for x, y in zip(a, b))


def header(args, load_before: tuple, device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), platform.processor())
        what = f"{model} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"
    return "\n".join([
        f"command: {' '.join(['python', 'benchmarks/efficiency.py', *sys.argv[1:]])}",
        f"date: {datetime.datetime.now().isoformat(timespec='minutes')}; machine: {what}; torch {torch.__version__}",
        f"load average (1/5/15 min) at the start: {'/'.join(f'{v:.1f}' for v in load_before)}, "
        f"at the end: {'/'.join(f'{v:.1f}' for v in os.getloadavg())}",
        f"backbone {args.backbone}, batch {args.batch_size}, {args.image_size}px, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; clock: "
        f"{args.clock or ('wall' if device.type == 'cuda' else 'cpu')}; {args.steps} paired rounds after "
        f"{args.warmup} warm-up",
    ])


def fmt(v, spec=".2f", suffix="×"):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def table(args, rows: dict[str, Row], peaks: dict[str, dict]) -> str:
    full, floor = rows.get("full"), rows["floor"]
    bare_infer = {b: statistics.median(floor.stats["infer"][b]) for b in ("b1", "bN")}
    lines = ["| row | tuned params | step (ms) | / floor | / full | / bare | token ratio | saved / full | "
             "peak / full | peak (MiB) | infer b1 / bare | infer bN / bare | bN / token floor | merged bN / bare |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full_saved = full.stats["saved_bytes"] if full else None
    full_peak = peaks.get("full", {}).get("peak_mb")
    for name, row in rows.items():
        s = row.stats
        infer = {b: statistics.median(s["infer"][b]) / bare_infer[b] if s["infer"][b] else None for b in ("b1", "bN")}
        token_floor = infer["bN"] / row.token_ratio if row.token_ratio and infer["bN"] else None
        merged = statistics.median(m / b for b, m in s["merged_vs_bare"]) if s["merged_vs_bare"] else None
        peak = peaks.get(name, {}).get("peak_mb")
        lines.append(" | ".join([
            f"| {name}", f"{row.tuned_params:,}", f"{1000 * statistics.median(s['steps']):.0f}",
            fmt(paired(rows, name, "floor")), fmt(paired(rows, name, "full")),
            fmt(paired(rows, name, row.counterpart)), fmt(row.token_ratio),
            fmt(s["saved_bytes"] / full_saved if full_saved else None),
            fmt(peak / full_peak if peak is not None and full_peak else None),
            "–" if peak is None else f"{peak:,.0f}",
            fmt(infer["b1"]), fmt(infer["bN"]), fmt(token_floor), fmt(merged) + " |"]))
    lines.append("")
    lines.append(f"floor: saved for backward {floor.stats['saved_bytes'] / 2**20:,.0f} MiB"
                 + (f", full: {full_saved / 2**20:,.0f} MiB" if full_saved else "")
                 + f"; bare inference b1 {1000 * bare_infer['b1']:.1f} ms, b{args.batch_size} "
                   f"{1000 * bare_infer['bN']:.1f} ms")
    return "\n".join(lines)


def main():
    p = _harness.parser(__doc__, DEFAULT_METHODS, "comma list; options after a colon, e.g. vpt-deep:num_tokens=50")
    p.add_argument("--grad-checkpoint", default="all", metavar="METHODS",
                   help="methods that also get a +gc row (--grad-checkpoint): all (every listed method that "
                        "back-propagates through the trunk), none, or a comma list")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: process CPU time (default on a CPU); wall: wall time (default on CUDA)")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                   help="run the peak children with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_): their "
                        "peak is then the live memory, without the heap's fragmentation")
    p.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    p.add_argument("--peak-row", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_row:
        print(json.dumps(peak_child(args)))
        return
    load_before = os.getloadavg()

    def progress(line):
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    device, backbone, x, y = _harness.child_inputs(args)
    names = row_names(args, backbone)
    peaks: dict[str, dict] = {}
    # the peak-memory children run one at a time beside the timing: the CPU clock counts this process's own work
    children = threading.Thread(target=lambda: peaks.update(measure_peaks(args, names, progress)))
    if not args.no_peak:
        children.start()
    rows = build_rows(args, backbone, x, y, names)
    progress(f"built {len(rows)} rows")
    measure_in_process(args, rows, x, progress)
    if not args.no_peak:
        children.join()
    text = header(args, load_before, device) + "\n\n" + table(args, rows, peaks)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header(args, load_before, device), "peaks": peaks,
                       "rows": {n: {"tuned_params": r.tuned_params, "token_ratio": r.token_ratio, **r.stats}
                                for n, r in rows.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
