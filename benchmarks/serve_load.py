"""`vistune serve` under a bounded load on loopback: C concurrent clients send a fixed number of single-image
requests (round robin over the tasks) and stop; p50/p99 latency and images/s, with dynamic batching (--max-batch
32) and without (--max-batch 1). The server is a subprocess on 127.0.0.1; nothing leaves the machine.

    python benchmarks/serve_load.py --backbone vistune/vit-tiny-cifar10 --method lora --tasks 4 --requests 256
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _tasks import make_tasks  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def _load(url: str, tasks: list[str], clients: int, requests: int, image: bytes) -> tuple[list[float], float]:
    import httpx

    latencies: list[float] = []
    counter = iter(range(requests))

    async def client(http):
        for i in counter:  # the clients share one bounded count of requests
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/tasks/{tasks[i % len(tasks)]}/predict",
                                files={"image": ("x.png", image)})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, time.perf_counter() - start


def _serve(dirs, backbone_batch: int, wait_ms: float, threads: int):
    port = _port()
    cmd = [sys.executable, "-m", "vistune", "serve", "--host", "127.0.0.1", "--port", str(port), "--threads",
           str(threads), "--max-batch", str(backbone_batch), "--max-wait-ms", str(wait_ms), "--log-level", "warning",
           "--max-queue", "1024"]
    for d in dirs:
        cmd += ["--adapter", str(d)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vistune/vit-tiny-cifar10")
    p.add_argument("--method", default="lora")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--requests", type=int, default=256, help="requests per measurement (fixed count)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = p.parse_args()
    from vistune.backbones import load_backbone

    root = Path(tempfile.mkdtemp(prefix="vistune-serve-load-"))
    dirs = make_tasks(load_backbone(args.backbone), args.method, args.tasks, root, args.image_size)
    names = [d.name for d in dirs]
    image = _png(0, args.image_size)
    print(f"backbone {args.backbone}, {args.tasks} {args.method} tasks, {args.requests} single-image requests per "
          f"row (round robin over the tasks), server torch threads {args.threads}, loopback, shared 2-core CPU "
          f"under load from other users (client and server on the same cores)")
    print("| batching | clients | img/s | p50 latency (ms) | p99 latency (ms) |")
    print("|---|---:|---:|---:|---:|")
    for label, batch in (("dynamic (--max-batch 32)", 32), ("off (--max-batch 1)", 1)):
        proc, url = _serve(dirs, batch, args.max_wait_ms, args.threads)
        try:
            asyncio.run(_load(url, names, 4, 16, image))  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                lat, elapsed = asyncio.run(_load(url, names, clients, args.requests, image))
                q = statistics.quantiles(lat, n=100)
                print(f"| {label} | {clients} | {len(lat) / elapsed:.0f} | {q[49] * 1e3:.1f} | {q[98] * 1e3:.1f} |",
                      flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
