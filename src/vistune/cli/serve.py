"""`vistune serve`: an HTTP server for many task artifacts on one frozen backbone (docs/serving.md)."""
from __future__ import annotations

import os

from ..errors import VistuneError
from .common import console, subparser


def cmd_serve(args) -> int:
    from ..serve import require_serving

    require_serving()
    import torch

    from ..artifacts import backbone_for, read_meta
    from ..data.images import PIXEL_LIMIT_ENV
    from ..multitask import MultiTask
    from ..serve import serve
    from ..serve.app import ServeConfig
    from ..training.trainer import resolve_device

    if args.max_batch < 1 or args.max_queue < 1 or args.max_images < 1 or args.max_wait_ms < 0:
        raise VistuneError("--max-batch, --max-queue and --max-images must be ≥ 1 and --max-wait-ms ≥ 0")
    if args.max_images > args.max_queue:
        raise VistuneError(f"--max-images {args.max_images} exceeds --max-queue {args.max_queue}: such a request "
                           "could never be admitted", "use --max-images ≤ --max-queue")
    for root in args.adapter_root:
        if not os.path.isdir(root):
            raise VistuneError(f"--adapter-root {root}: no such folder", "give an existing folder")
    if args.max_image_pixels is not None:
        os.environ[PIXEL_LIMIT_ENV] = str(args.max_image_pixels)  # read by the data layer's image decoder
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_meta(args.adapter[0])
    device = resolve_device(args.device)
    model = MultiTask(backbone_for(meta), args.adapter, device=device)
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_images=args.max_images, max_body_bytes=int(args.max_body_mb * 2**20),
                         top_k=args.top_k, adapter_roots=list(args.adapter_root))
    console.print(f"serving {len(model.tasks)} task(s) on one {meta['backbone']['name']} ({device}): "
                  f"{', '.join(model.tasks)} — http://{args.host}:{args.port}/v1/tasks", highlight=False)
    serve(model, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_parsers(sub) -> None:
    p = subparser(sub, "serve", help="HTTP server: many task artifacts on one frozen backbone, batched across tasks")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="artifact folder to serve (repeat for more tasks; all on the same backbone weights)")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="folder POST /v1/tasks may load artifacts from (repeatable; default: none, hot loading off)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="images per model pass, over all tasks (1 = no dynamic batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch waits for more images after its first")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="images admitted and not yet answered; more get 503 + Retry-After")
    p.add_argument("--max-images", type=int, default=64, metavar="N", help="images per request")
    p.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB", help="request body limit")
    p.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="refuse images with more pixels (decompression bombs; default: $VISTUNE_MAX_IMAGE_PIXELS, "
                        "else PIL's 89,478,485)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image unless a request asks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=cmd_serve)
