"""`vistune train` (one job end to end) and `vistune calibrate` (SCT's calibration pass alone)."""
from __future__ import annotations

from rich.table import Table

from ..errors import VistuneError
from ..output import phase_times, print_table
from .common import (add_backbone_args, add_data_args, add_train_args, console, epoch_lines, method_options, notify,
                     subparser, train_config)


def _print_metrics(m: dict) -> None:
    table = Table(show_header=False, title=f"{m['method']} on {m['backbone']}")
    rows = [
        ("val accuracy", f"{m['val_accuracy']:.4f} (epoch {m['best_epoch']})"),
        ("test accuracy", "-" if m["test_accuracy"] is None else f"{m['test_accuracy']:.4f}"),
        *([("val mIoU", f"{m['val_miou']:.4f} (pixel accuracy above)"),
           ("test mIoU", "-" if m["test_miou"] is None else f"{m['test_miou']:.4f}")]
          if m.get("task") == "segmentation" else []),
        ("tuned params", f"{m['tuned_params']:,} ({m['tuned_percent']:.3f}% of backbone; "
                         f"{m['tuned_params_excluding_head']:,} excl. head)"),
        ("backbone params", f"{m['backbone_params']:,}"),
        ("artifact", f"{m.get('artifact_bytes', 0):,} bytes"),
        ("train time", f"{m['train_seconds']:.1f} s (epochs: training + val eval)"),
        *([("job time", phase_times(m["timings"]))] if m.get("timings") else []),
    ]
    for k, v in rows:
        table.add_row(k, v)
    print_table(console, table)


def cmd_train(args) -> int:
    from ..run import Job, run_job
    from ..training import distributed

    job = Job(backbone=args.backbone, method=args.method, data=args.data, out=args.out,
              overrides=method_options(args.set, args.method), checkpoint=args.checkpoint, random_init=args.random_init,
              image_size=args.image_size, normalization=args.normalization, augment=args.augment,
              train_size=args.train_size, val_size=args.val_size, data_seed=args.data_seed, train=train_config(args),
              task=args.task, keep_state=args.keep_state)
    with distributed.process_group(args.device):  # several processes under torchrun; else a no-op
        metrics = run_job(job, resume=args.resume, progress=not args.quiet, notify=notify,
                          on_epoch=epoch_lines(not args.quiet))
        if not distributed.is_main():
            return 0  # rank 0 reports (and alone wrote the artifact)
    metrics.pop("model")
    _print_metrics(metrics)
    console.print(f"artifact: {args.out}/adapter.safetensors, adapter.json, metrics.json")
    return 0


def cmd_calibrate(args) -> int:
    """SCT's calibration pass alone, over the same training split `vistune train` would calibrate on."""
    from .._io import atomic_write_json
    from ..methods.sct import calibrate
    from ..run import Job, check_memory, prepare_job
    from ..training import TrainConfig

    if args.top_k is not None and args.top_k < 1:
        raise VistuneError(f"--top-k {args.top_k} must be ≥ 1")
    if args.ratio is not None and not 0 < args.ratio <= 1:
        raise VistuneError(f"--ratio {args.ratio} must be in (0, 1]", "e.g. --ratio 0.125")
    overrides = {"placement": args.placement, "top_k": args.top_k,
                 **({"ratio": args.ratio} if args.ratio is not None else {})}
    job = Job(backbone=args.backbone, method="sct", data=args.data, overrides=overrides, checkpoint=args.checkpoint,
              random_init=args.random_init, image_size=args.image_size, normalization=args.normalization,
              train_size=args.train_size, val_size=args.val_size, data_seed=args.data_seed,
              train=TrainConfig(device=args.device))
    setup = prepare_job(job, augment=False, notify=notify)  # the split `vistune train` calibrates on, un-augmented
    check_memory(setup, batch_size=args.batch_size, backward=False)
    config = setup.config
    result = calibrate(setup.backbone, setup.data.train, placement=config.placement, top_k=config.top_k,
                       ratio=config.ratio, batch_size=args.batch_size, device=setup.device, progress=not args.quiet)
    table = Table(title=f"SCT salient channels: {args.backbone} on {args.data} "
                        f"({result.num_images} train images, placement {result.placement})")
    for col in ("layer", "D", "K", "top channels (by score)", "score range"):
        table.add_column(col)
    for layer in result.layers:
        order = layer.scores.argsort(descending=True)
        top = ", ".join(f"{int(layer.indices[j])}" for j in order[:8]) + (" …" if len(order) > 8 else "")
        table.add_row(layer.name, str(layer.dim), str(len(layer.indices)), top,
                      f"{float(layer.scores.min()):.4g} … {float(layer.scores.max()):.4g}")
    print_table(console, table)
    if args.out:
        atomic_write_json(args.out, {"backbone": args.backbone, "data": args.data,
                                     "image_size": setup.preprocessing["image_size"], "top_k": args.top_k,
                                     "ratio": None if args.top_k is not None else config.ratio,
                                     **result.to_dict()})
        console.print(f"wrote {args.out}")
    else:
        console.print("full indices and scores: add --out FILE.json")
    return 0


def add_parsers(sub) -> None:
    p = subparser(sub, "train", help="train a method on a dataset and write an artifact")
    add_backbone_args(p)
    p.add_argument("--method", required=True, metavar="M", help="method name (see `vistune methods`)")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="method option, repeatable (see `vistune methods --details`), e.g. --set r=8")
    add_data_args(p)
    p.add_argument("--out", required=True, metavar="OUT", help="folder for the artifact and metrics.json")
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                   help="segmentation: an FPN decoder on the backbone's multi-scale features, per-pixel loss, "
                        "val selection and report by mIoU; data: seg-digits or a folder of images/ + index-mask "
                        "masks/ (docs/segmentation.md)")
    add_train_args(p)
    p.add_argument("--augment", action="store_true",
                   help="FGVC-style random-resized-crop + flip (default: none, as VTAB-1k)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in OUT (refused if any setting differs from that run's)")
    p.add_argument("--keep-state", action="store_true",
                   help="keep the training checkpoint (train_state.pt) in OUT once the run has finished")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, nor the line per epoch printed instead where stderr is no terminal")
    p.set_defaults(func=cmd_train)

    p = subparser(sub, "calibrate", help="SCT's calibration pass alone: per-layer salient channels "
                                         "(top-K indices and class-aware scores)")
    add_backbone_args(p)
    add_data_args(p)
    k = p.add_mutually_exclusive_group()
    k.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="salient channels per layer/stage (default: set by --ratio)")
    k.add_argument("--ratio", type=float, default=None, metavar="R", help="K = round(D·R), at least 1 (default 1/8)")
    p.add_argument("--placement", choices=["attn", "mlp-branch", "mlp"], default="attn",  # sct.PLACEMENTS
                   help="ViT/Swin: attn = scores on norm2's input (the paper's); mlp-branch (official sct_mlp) and "
                        "mlp (vistune 0.1.0's) = scores on the block output; CNNs: the stage output")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per calibration batch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", metavar="FILE.json", help="write every layer's indices and scores as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)
