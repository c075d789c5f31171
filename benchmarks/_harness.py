"""What the per-configuration benchmark scripts share (run as `python benchmarks/<script>.py`).

Each script measures one configuration per child process (so that peak memory is that
configuration's own) and prints a table of the rows the children return.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable

import torch

# the timing, precision, memory and training-step pieces are those of `vistune bench`'s efficiency protocol
from vistune.bench.efficiency import autocast, sgd_step, timeit, timeit_interleaved
from vistune.bench.efficiency import peak_memory_mb as peak_mb

__all__ = ["autocast", "peak_mb", "sgd_step", "timeit", "timeit_interleaved", "split_methods", "method_config",
           "run_configs", "parser", "child_inputs", "main", "machine", "NUM_CLASSES"]
NUM_CLASSES = 10


def parser(doc: str, methods: str, methods_help: str) -> argparse.ArgumentParser:
    """The arguments every benchmark script takes (``--methods`` default and help are the script's)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--model-kwargs", default="", help="JSON dict of timm kwargs (with --random-init)")
    p.add_argument("--methods", default=methods, help=methods_help)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--config", help=argparse.SUPPRESS)  # child mode
    return p


def main(args, script: str, configs: list[str], measure: Callable, print_table: Callable) -> None:
    """Child mode (``--config``): print ``measure(args)`` as JSON; otherwise run every config in a child
    process and print the table of their rows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        print(json.dumps(measure(args)))
        return
    print_table(run_configs(script, configs), args)


def child_inputs(args):
    """(device, backbone, images, labels) of one child: seeded, the same for every configuration."""
    from vistune.backbones import load_backbone

    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    backbone = load_backbone(args.backbone, random_init=args.random_init, model_kwargs=kwargs)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    return device, backbone, x, y


def machine(args) -> str:
    """The table header's description of the device and the settings."""
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    return (f"backbone {args.backbone}, batch {args.batch_size}, {args.image_size}px, {dev}, torch {torch.__version__}, "
            f"median of {args.steps} steps after {args.warmup} warm-up")


def split_methods(text: str) -> list[str]:
    """'a,b:k=1,k2=2,c' → ['a', 'b:k=1,k2=2', 'c'] (a key=value continues the previous method)."""
    out: list[str] = []
    for part in text.split(","):
        if "=" in part and ":" not in part and out:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def method_config(spec: str):
    """'name:k=v,k2=v2' → (name, {k: v, k2: v2})."""
    name, _, opts = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in opts.split(",") if kv)


def run_configs(script: str, configs: list[str]) -> list[dict]:
    """Run ``script --config C <this process's arguments>`` for each C in its own process; their rows."""
    args = [a for a in sys.argv[1:] if not a.startswith("--config")]
    rows = []
    for config in configs:
        out = subprocess.run([sys.executable, script, "--config", config, *args], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {config}", file=sys.stderr)
    return rows
