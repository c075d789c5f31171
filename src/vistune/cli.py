"""The ``vistune`` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import VistuneError

console = Console()


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise VistuneError(f"--set {pair!r} is not key=value", "write e.g. --set reduction=8")
        out[key.strip()] = value.strip()
    return out


# ---- methods / backbones ----------------------------------------------------------------
def cmd_methods(args) -> int:
    from .methods import CATEGORIES, METHODS

    table = Table(title="vistune methods")
    for col in ("method", "category", "families", "description"):
        table.add_column(col)
    for info in sorted(METHODS.values(), key=lambda i: (CATEGORIES.index(i.category), i.name)):
        table.add_row(info.name, info.category, ", ".join(info.families), info.description)
    console.print(table)
    if args.details:
        for info in sorted(METHODS.values(), key=lambda i: i.name):
            fields = info.config_class.fields_help()
            if not fields:
                continue
            t = Table(title=f"{info.name} options (--set key=value)")
            for col in ("key", "type", "default", "help"):
                t.add_column(col)
            for key, (tp, default, text) in fields.items():
                t.add_row(key, tp, repr(default), text)
            console.print(t)
    else:
        console.print("Options of each method: vistune methods --details")
    return 0


def cmd_backbones(args) -> int:
    from .backbones import OFFLINE_BACKBONES, packaged_backbones

    table = Table(title="Offline backbones (no network needed)")
    for col in ("name", "timm architecture", "weights", "installed", "description"):
        table.add_column(col, no_wrap=col == "name")
    for name, card in sorted(packaged_backbones().items()):
        table.add_row(name, card["architecture"], "inside vistune (see its model card)", "yes", card["description"])
    for b in OFFLINE_BACKBONES.values():
        table.add_row(b.name, b.architecture, f"PyPI {b.package}", "yes" if b.available() else f"no: {b.install}",
                      b.description)
    console.print(table)
    console.print(
        "Any timm model name also works when online, e.g. [bold]vit_base_patch16_224.orig_in21k[/] "
        "(the VPT paper's backbone), [bold]vit_small_patch14_dinov2.lvd142m[/], "
        "[bold]swin_tiny_patch4_window7_224[/], [bold]convnext_tiny[/].\n"
        "Local weights: --backbone <timm architecture> --checkpoint FILE (.safetensors/.pth/.npz).\n"
        "Random weights for shape checks: --backbone <timm architecture> --random-init.\n"
        "Families with a view: vit (VisionTransformer & kin), swin, cnn (EfficientNet, MobileNet, "
        "ResNet, ConvNeXt). List timm names with: python -c \"import timm; print(timm.list_models('vit_*'))\""
    )
    return 0


# ---- train / eval / predict ---------------------------------------------------------------
def _train_config(args):
    from .training import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        select=args.select, seed=args.seed, device=args.device, amp=args.amp, num_workers=args.workers,
    )


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
        ("train time", f"{m['train_seconds']:.1f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def cmd_train(args) -> int:
    from .run import Job, run_job
    from .training import distributed

    job = Job(backbone=args.backbone, method=args.method, data=args.data, out=args.out,
              overrides=_parse_sets(args.set), checkpoint=args.checkpoint, random_init=args.random_init,
              image_size=args.image_size, normalization=args.normalization, augment=args.augment,
              train_size=args.train_size, val_size=args.val_size, train=_train_config(args), task=args.task)
    with distributed.process_group(args.device):  # several processes under torchrun; else a no-op
        metrics = run_job(job, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0  # rank 0 reports (and alone wrote the artifact)
    metrics.pop("model")
    _print_metrics(metrics)
    console.print(f"artifact: {args.out}/adapter.safetensors, adapter.json, metrics.json")
    return 0


def _load_for_inference(args):
    from .artifacts import backbone_for, load_artifact, read_meta
    from .backbones import load_backbone
    from .training.trainer import resolve_device

    meta = read_meta(args.adapter)
    backbone = None
    if args.checkpoint:  # the weights file moved: same architecture, new path
        b = meta["backbone"]
        backbone = load_backbone(b["name"], checkpoint=args.checkpoint, model_kwargs=b.get("model_kwargs") or {})
    else:
        backbone = backbone_for(meta)
    device = resolve_device(args.device)
    model, meta = load_artifact(args.adapter, backbone=backbone, device=device)
    if args.deploy:
        if not hasattr(model, "deploy"):
            raise VistuneError(f"--deploy: the {meta['method']!r} artifact in {args.adapter} has no input-only mode",
                               "only pgn artifacts deploy as pixels; drop --deploy")
        model.deploy = True  # prompts become extra input pixel patches; nothing learned enters the backbone
    return model, meta, device


def cmd_eval(args) -> int:
    from .run import data_for_task
    from .training import evaluate

    model, meta, device = _load_for_inference(args)
    segmentation = meta.get("task") == "segmentation"
    make_transforms, load = data_for_task(meta.get("task", "classification"))
    _, eval_tf = make_transforms(meta["preprocessing"])
    # redraw the splits exactly as training did (seed, subset sizes), so --split val is the run's val set
    splits = {k: v for k, v in meta.get("data", {}).items() if k != "spec"}
    data = load(args.data, train_transform=eval_tf, eval_transform=eval_tf, **splits)
    if data.class_names != meta["class_names"]:
        raise VistuneError(
            f"the classes of {args.data} ({data.class_names[:10]}…) differ from the artifact's "
            f"({meta['class_names'][:10]}…)",
            "evaluate on data with the same class folders / labels the adapter was trained on",
        )
    split = getattr(data, args.split)
    if split is None:
        raise VistuneError(f"{args.data} has no {args.split} split", "use --split val or provide a test/ folder")
    res = evaluate(model, split, batch_size=args.batch_size, device=device, progress=not args.quiet)
    res.update(split=args.split, adapter=str(args.adapter), data=args.data, method=meta["method"], deploy=args.deploy)
    if args.json:
        print(json.dumps(res))
    elif segmentation:
        console.print(f"{meta['method']} on {args.data} [{args.split}]: mIoU {res['miou']:.4f}, pixel accuracy "
                      f"{res['pixel_accuracy']:.4f} over {res['n']} images (mean pixel loss {res['loss']:.4f})")
    else:
        mode = " (deployed as pixels)" if args.deploy else ""
        console.print(f"{meta['method']}{mode} on {args.data} [{args.split}]: accuracy {res['accuracy']:.4f} "
                      f"over {res['n']} images (mean loss {res['loss']:.4f})")
    return 0


def cmd_predict(args) -> int:
    import torch

    from .data import load_image
    from .run import transforms_for

    model, meta, device = _load_for_inference(args)
    if meta.get("task") == "segmentation":
        return _predict_masks(args, model, meta, device)
    if args.mask_out:
        raise VistuneError(f"--mask-out: {args.adapter} holds a {meta.get('task', 'classification')} artifact",
                           "masks come from artifacts trained with --task segmentation; drop --mask-out")
    _, eval_tf = transforms_for(meta["preprocessing"])
    names = meta["class_names"]
    k = min(args.top_k, len(names))
    results = []
    for path in args.images:
        x = eval_tf(load_image(path)).unsqueeze(0).to(device)
        with torch.no_grad():
            probs = model(x).float().softmax(-1)[0].cpu()
        top = probs.topk(k)
        entry = {"image": str(path),
                 "top_k": [{"class": names[i], "probability": float(p)} for p, i in zip(top.values, top.indices)]}
        if args.json:
            entry["probabilities"] = {n: float(p) for n, p in zip(names, probs)}
        results.append(entry)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            preds = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"])
            console.print(f"{r['image']}: {preds}")
    return 0


def _predict_masks(args, model, meta, device) -> int:
    """Segmentation artifacts: per image, the class of every pixel (logits upsampled to the image's own size);
    ``--mask-out DIR`` writes DIR/<stem>.png, a palette PNG whose pixel values are the class indices."""
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from .data import load_image
    from .data.segmentation import seg_transforms, write_mask_png

    _, eval_tf = seg_transforms(meta["preprocessing"])
    names = meta["class_names"]
    results = []
    for path in args.images:
        img = load_image(path)
        x, _ = eval_tf(img, torch.zeros(img.height, img.width, dtype=torch.uint8).numpy())
        with torch.no_grad():
            logits = model(x.unsqueeze(0).to(device)).float()
            mask = F.interpolate(logits, size=(img.height, img.width), mode="bilinear",
                                 align_corners=False).argmax(1)[0].cpu()
        counts = torch.bincount(mask.flatten(), minlength=len(names))
        entry = {"image": str(path), "classes": {names[k]: float(c) / mask.numel()
                                                 for k, c in enumerate(counts.tolist()) if c}}
        if args.mask_out:
            out = Path(args.mask_out) / f"{Path(path).stem}.png"
            write_mask_png(out, mask.numpy().astype("uint8"))
            entry["mask"] = str(out)
        results.append(entry)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            top = sorted(r["classes"].items(), key=lambda kv: -kv[1])[: args.top_k]
            where = f" → {r['mask']}" if "mask" in r else ""
            console.print(f"{r['image']}: " + ", ".join(f"{n} {f:.1%}" for n, f in top) + where)
    return 0


def cmd_export(args) -> int:
    from .merge import export_merged, export_peft

    if not (args.merged or args.peft):
        raise VistuneError("export: nothing to write", "pass --merged FILE.safetensors and/or --peft DIR")
    model, meta, _ = _load_for_inference(args)
    if args.merged:
        export_merged(model, args.merged, class_names=meta["class_names"])
        console.print(f"{args.merged}: plain timm {meta['backbone']['architecture']} state_dict with the "
                      f"{meta['method']} update merged in and a {meta['num_classes']}-class head "
                      f"(timm.create_model(arch, num_classes={meta['num_classes']}) loads it)")
    if args.peft:
        export_peft(model, args.peft)
        console.print(f"{args.peft}: peft adapter_model.safetensors + adapter_config.json "
                      "(PeftModel.from_pretrained(timm_model, DIR))")
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain import pretrain

    card = pretrain(args.recipe, args.data, args.out, epochs=args.epochs, device=args.device,
                    progress=not args.quiet, seed=args.seed)
    console.print(f"{card['name']}: CIFAR-10 test top-1 {card['test_top1']:.4f}, {card['params']:,} params, "
                  f"{card['wall_seconds']:.0f} s on {card['hardware']}; wrote {args.out}/{card['weights']} + card")
    return 0


def cmd_data_vtab(args) -> int:
    from pathlib import Path

    from .data import vtab_download as vtab

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.download:
        written = vtab.download(args.out, tasks, tfds_dir=args.tfds_dir, log=console.print)
        console.print(f"wrote {len(written)} task folder(s) under {args.out}; use them with "
                      f"vistune bench --suite vtab-1k --data-root {args.out}")
        return 0
    problems = 0
    for task in vtab.select_tasks(tasks):  # without --download: check what is there against the manifests
        folder = Path(args.out) / task.name
        if not (folder / vtab.MANIFEST).is_file():
            console.print(f"{task.name}: missing")
            problems += 1
            continue
        bad = vtab.verify_task(folder)
        problems += bool(bad)
        console.print(f"{task.name}: " + (f"{len(bad)} file(s) missing or changed, e.g. {bad[0]}" if bad else "intact"))
    if problems:
        raise VistuneError(f"{problems} VTAB-1k task folder(s) under {args.out} are missing or damaged",
                           f"vistune data vtab --download --out {args.out} writes the missing ones "
                           "(delete a damaged task folder first)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick, device=args.device, progress=not args.quiet)
    return 0


# ---- parser --------------------------------------------------------------------------------
def _add_backbone_args(p, required=True):
    p.add_argument("--backbone", required=required, metavar="B",
                   help="timm model name, offline backbone (see `vistune backbones`), or timm architecture "
                        "with --checkpoint/--random-init")
    p.add_argument("--checkpoint", metavar="FILE", help="local backbone weights (.safetensors/.pth/.npz)")
    p.add_argument("--random-init", action="store_true",
                   help="random backbone weights (shape checks and tests only; never silently)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistune",
        description="Adapt frozen pretrained vision models (any timm backbone) with parameter-efficient methods.",
        epilog="Start with `vistune demo`, then `vistune methods` and `vistune backbones`. Docs: docs/",
    )
    parser.add_argument("--version", action="version", version=f"vistune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("--details", action="store_true", help="also list each method's options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("backbones", help="list offline backbones and how to name any timm model")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("train", help="train a method on a dataset and write an artifact",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_backbone_args(p)
    p.add_argument("--method", required=True, metavar="M", help="method name (see `vistune methods`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (see `vistune methods --details`)")
    p.add_argument("--data", required=True, metavar="D",
                   help="image folder (train/<class>/…), VTAB-1k list-file folder, or built-in: "
                        "fashion-mnist, mnist5k, digits, cifar10:<path>")
    p.add_argument("--out", required=True, metavar="OUT", help="folder for the artifact and metrics.json")
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                   help="segmentation: an FPN decoder on the backbone's multi-scale features, per-pixel loss, "
                        "val selection and report by mIoU; data: seg-digits or a folder of images/ + index-mask "
                        "masks/ (docs/segmentation.md)")
    p.add_argument("--train-size", type=int, metavar="N", help="stratified N-image subset of train (VTAB-1k: 800)")
    p.add_argument("--val-size", type=int, metavar="N", help="stratified N-image subset of val (VTAB-1k: 200)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="base lr, scaled by batch/256 (default: 1.0 for SGD, 1e-3 for AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="default: the method's (SGD momentum 0.9; AdamW for full)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="default: 10%% of epochs")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--select", choices=["best-val", "last"], default="best-val",
                   help="which epoch's weights to keep (never selected on test)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on CPU where it is slower)")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's pretrained size")
    p.add_argument("--normalization", choices=["pretrained_cfg", "paper"], default="pretrained_cfg",
                   help="mean/std of the backbone's pretrained_cfg, or ImageNet's as the VPT/SCT papers")
    p.add_argument("--augment", action="store_true",
                   help="FGVC-style random-resized-crop + flip (default: none, as VTAB-1k)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    for name, helptext in (("eval", "accuracy (segmentation: mIoU) of an artifact on a dataset split"),
                           ("predict", "top-k classes for images (segmentation: per-pixel classes, --mask-out)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--adapter", required=True, metavar="OUT", help="folder written by `vistune train`")
        p.add_argument("--checkpoint", metavar="FILE",
                       help="the backbone weights file, if it moved since training (must be identical)")
        p.add_argument("--device", default="auto")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--quiet", action="store_true")
        p.add_argument("--deploy", action="store_true",
                       help="pgn: input-only mode, the prompts enter the frozen backbone as extra pixel patches")
        if name == "eval":
            p.add_argument("--data", required=True, metavar="D")
            p.add_argument("--split", choices=["train", "val", "test"], default="test")
            p.add_argument("--batch-size", type=int, default=64)
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("images", nargs="+", metavar="IMAGE")
            p.add_argument("--top-k", type=int, default=5)
            p.add_argument("--mask-out", metavar="DIR",
                           help="segmentation artifacts: write DIR/<image stem>.png, a palette PNG of class indices")
            p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="prepare benchmark data sets")
    data_sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    p = data_sub.add_parser("vtab", help="VTAB-1k's 19 tasks as list-file folders (train800/val200/test), "
                                         "through tensorflow-datasets (pip install 'vistune[vtab]')")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for <task>/ folders (the bench --data-root)")
    p.add_argument("--download", action="store_true",
                   help="download and write missing tasks (needs the network); without it: verify DIR's tasks "
                        "against their manifest checksums")
    p.add_argument("--tasks", metavar="T,T,…", help="only these tasks (default: all 19)")
    p.add_argument("--tfds-dir", metavar="DIR", help="tensorflow-datasets' data_dir (default: tfds's, ~/tensorflow_datasets)")
    p.set_defaults(func=cmd_data_vtab)

    p = sub.add_parser("export", help="merge an artifact into a plain timm model (--merged) or write peft's "
                                      "format (--peft); lora, dora, ia3, ln-tuning, ssf, bias, partial, full")
    p.add_argument("--adapter", required=True, metavar="OUT", help="folder written by `vistune train`")
    p.add_argument("--merged", metavar="FILE.safetensors",
                   help="timm state_dict with the update folded into the weights and the head as timm's classifier")
    p.add_argument("--peft", metavar="DIR", help="peft adapter_model.safetensors + adapter_config.json")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="the backbone weights file, if it moved since training (must be identical)")
    p.set_defaults(func=cmd_export, device="cpu", deploy=False)

    p = sub.add_parser("demo", help="adapt the real ImageNet EfficientNet-Lite0 to a real offline dataset "
                                    "with several methods and print a comparison table")
    p.add_argument("--out", default="vistune-demo", help="folder for the artifacts")
    p.add_argument("--quick", action="store_true", help="a tiny run (about a minute), for smoke tests")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="pretrain vistune's own small ViT/Swin from scratch (e.g. on CIFAR-10)")
    p.add_argument("recipe", help="vistune/vit-tiny-cifar10 or vistune/swin-tiny-cifar10")
    p.add_argument("--data", required=True, help="e.g. cifar10:../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--out", required=True, help="folder for <name>.safetensors and its model card <name>.json")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    # ---- bench / report (src/vistune/bench) ----
    def _cmd_bench(args) -> int:
        from .bench.cli import cmd_bench

        return cmd_bench(args)

    def _cmd_report(args) -> int:
        from .bench.cli import cmd_report

        return cmd_report(args)

    p = sub.add_parser("bench", help="benchmark methods on a suite of tasks (VPT protocol: select lr×wd on val, "
                                     "retrain with several seeds, report test top-1); resumable")
    p.add_argument("--suite", required=True, metavar="S",
                   help="built-in suite (offline-mini, vtab-1k, fgvc) or the path of a suite .toml file")
    p.add_argument("--methods", required=True, metavar="M,M,…", help="comma-separated methods, e.g. linear,bias,adapter")
    _add_backbone_args(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="bench folder: results.sqlite, runs/<task>/<method>/seed<k>/, report.md; re-run to resume")
    p.add_argument("--data-root", metavar="R", help="folder holding <task>/ folders (vtab-1k, fgvc)")
    p.add_argument("--tasks", metavar="T,T,…", help="only these tasks of the suite")
    p.add_argument("--epochs", type=int, metavar="N", help="default: the suite's")
    p.add_argument("--lr-grid", metavar="LR,LR,…", help="base lrs searched on val (default: the suite's)")
    p.add_argument("--wd-grid", metavar="WD,WD,…", help="weight decays searched on val (default: the suite's)")
    p.add_argument("--seeds", metavar="S,S,…", help="seeds of the final runs (default: the suite's)")
    p.add_argument("--image-size", type=int, metavar="N", help="default: the suite's (or the backbone's)")
    p.add_argument("--batch-size", type=int, metavar="N", help="default: the suite's")
    p.add_argument("--test-size", type=int, metavar="N", help="fixed stratified test subset (default: the suite's)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="method option (adapter.reduction=8) or per-method epochs/batch_size/optimizer/"
                        "warmup_epochs/lr_grid/wd_grid (linear.epochs=30); repeatable")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: runs one after another in this process; ray: in parallel on Ray "
                        "(pip install 'vistune[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="existing Ray cluster (auto, ray://host:10001); default: start one on this machine")
    p.add_argument("--cpus-per-run", type=float, default=1.0, metavar="N", help="Ray: CPUs reserved per run")
    p.add_argument("--gpus-per-run", type=float, metavar="N",
                   help="Ray: GPUs reserved per run (default: 1 when the runs use CUDA, else 0; 0.5 packs two)")
    p.add_argument("--no-efficiency", action="store_true",
                   help="skip the per-method efficiency measurement (train img/s, peak memory, latency b1/bN) "
                        "that follows the runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-run lines")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="write the Markdown report + accuracy-vs-params plot of a bench folder")
    p.add_argument("dir", metavar="DIR", help="the --out folder of `vistune bench`")
    p.add_argument("--out", metavar="FILE", help="report path (default: DIR/report.md); the plot goes to "
                                                 "DIR/accuracy_vs_params.png")
    p.set_defaults(func=_cmd_report)
    # ---- calibrate (SCT) ----
    def _cmd_calibrate(args) -> int:
        from .methods.sct import cli_calibrate

        return cli_calibrate(args)

    p = sub.add_parser("calibrate", help="SCT's calibration pass alone: per-layer salient channels "
                                         "(top-K indices and class-aware scores)")
    _add_backbone_args(p)
    p.add_argument("--data", required=True, metavar="D", help="image folder, list-file folder or built-in data set")
    p.add_argument("--train-size", type=int, metavar="N", help="stratified N-image subset of train (as `train`)")
    p.add_argument("--val-size", type=int, metavar="N", help="as `train` (val is carved off train when absent)")
    p.add_argument("--seed", type=int, default=42, help="as `train`: fixes the subsets")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's pretrained size")
    p.add_argument("--normalization", choices=["pretrained_cfg", "paper"], default="pretrained_cfg")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--top-k", type=int, default=None, metavar="K", help="salient channels per layer/stage")
    k.add_argument("--ratio", type=float, default=None, metavar="R", help="K = round(D·R), at least 1 (default 1/8)")
    p.add_argument("--placement", choices=["attn", "mlp"], default="attn",
                   help="ViT/Swin: attn = input of norm2 (the paper's), mlp = block output; CNNs: stage output")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", metavar="FILE.json", help="write every layer's indices and scores as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("VISTUNE_LOG", "WARNING"), format="vistune: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command != "train":
            raise VistuneError(f"`vistune {args.command}` runs in one process; torchrun started several",
                               "use torchrun only for `vistune train` (one data-parallel run); "
                               "run this command without torchrun")
        return args.func(args)
    except VistuneError as e:
        print(f"error: {e.what}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        resumable = args.command in ("train", "demo")  # bench prints its own message; others write no checkpoint
        hint = f"; continue with the same command plus --resume (checkpoint in {out})" if out and resumable else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
