"""`vistune eval`, `vistune predict` and `vistune export`: using a trained artifact."""
from __future__ import annotations

import json

from ..errors import VistuneError
from .common import console, subparser


def _deployable_methods() -> list[str]:
    from ..methods import METHODS

    return sorted(n for n, i in METHODS.items() if i.method_class.deployable)


def _load_for_inference(args):
    from ..artifacts import backbone_for, load_artifact, read_meta
    from ..backbones import load_backbone
    from ..training.trainer import resolve_device

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
        if not model.deployable:
            raise VistuneError(f"--deploy: the {meta['method']!r} artifact in {args.adapter} has no input-only mode",
                               f"only {', '.join(_deployable_methods())} artifacts have one; drop --deploy")
        model.deploy = True  # prompts become extra input pixel patches; nothing learned enters the backbone
    return model, meta, device


def cmd_eval(args) -> int:
    from ..run import data_for_task
    from ..training import evaluate

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
        console.print(f"{meta['method']} on {args.data}, {args.split} split: mIoU {res['miou']:.4f}, pixel accuracy "
                      f"{res['pixel_accuracy']:.4f} over {res['n']} images (mean pixel loss {res['loss']:.4f})")
    else:
        mode = " (deployed as pixels)" if args.deploy else ""
        console.print(f"{meta['method']}{mode} on {args.data}, {args.split} split: accuracy {res['accuracy']:.4f} "
                      f"over {res['n']} images (mean loss {res['loss']:.4f})")
    return 0


def cmd_predict(args) -> int:
    import torch

    from ..data import load_image
    from ..run import transforms_for

    if args.top_k < 1:
        raise VistuneError(f"--top-k {args.top_k} must be ≥ 1", "e.g. --top-k 5 (classes shown per image)")
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

    from ..data import load_image
    from ..data.segmentation import seg_transforms, write_mask_png

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
    from ..merge import describe_preprocessing, export_merged, export_peft, inference_preprocessing

    if not (args.merged or args.peft or args.onnx):
        raise VistuneError("export: nothing to write", "pass --merged FILE.safetensors, --peft DIR and/or --onnx FILE")
    model, meta, _ = _load_for_inference(args)
    if args.merged:
        export_merged(model, args.merged, class_names=meta["class_names"], preprocessing=meta["preprocessing"])
        console.print(f"{args.merged}: plain timm {meta['backbone']['architecture']} state_dict with the "
                      f"{meta['method']} update merged in and a {meta['num_classes']}-class head "
                      f"(timm.create_model(arch, num_classes={meta['num_classes']}) loads it)")
        console.print("input preprocessing (in the file's metadata as \"preprocessing\", with \"class_names\"): "
                      + describe_preprocessing(inference_preprocessing(meta["preprocessing"])))
    if args.peft:
        export_peft(model, args.peft)
        console.print(f"{args.peft}: peft adapter_model.safetensors + adapter_config.json "
                      "(PeftModel.from_pretrained(timm_model, DIR))")
    if args.onnx:
        from ..onnx_export import export_onnx

        report = export_onnx(model, args.onnx, meta)
        console.print(f"{args.onnx}: ONNX ({report['graph']} graph; input images (B, 3, {report['image_size']}, "
                      f"{report['image_size']}), preprocessing and classes in its metadata); onnxruntime matches "
                      f"PyTorch to {report['max_abs_diff']:.1e}")
    return 0


def _add_artifact_args(p) -> None:
    p.add_argument("--adapter", required=True, metavar="OUT", help="folder written by `vistune train`")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="the backbone weights file, if it moved since training (must be identical)")


def add_parsers(sub) -> None:
    for name, helptext in (("eval", "accuracy (segmentation: mIoU) of an artifact on a dataset split"),
                           ("predict", "top-k classes for images (segmentation: per-pixel classes, --mask-out)")):
        p = subparser(sub, name, help=helptext)
        _add_artifact_args(p)
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--deploy", action="store_true",
                       help="pgn: input-only mode, the prompts enter the frozen backbone as extra pixel patches")
        if name == "eval":
            p.add_argument("--data", required=True, metavar="D",
                           help="the data set the artifact was trained on (same classes); its splits are redrawn "
                                "exactly as in training")
            p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which split to score")
            p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch")
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
            p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes shown per image")
            p.add_argument("--mask-out", metavar="DIR",
                           help="segmentation artifacts: write DIR/<image stem>.png, a palette PNG of class indices")
            p.set_defaults(func=cmd_predict)

    p = subparser(sub, "export", help="merge an artifact into a plain timm model (--merged) or write peft's "
                                      "format (--peft)")
    _add_artifact_args(p)
    p.add_argument("--merged", metavar="FILE.safetensors",
                   help="timm state_dict with the update folded into the weights and the head as timm's classifier; "
                        "its metadata holds the architecture, class names and input preprocessing")
    p.add_argument("--peft", metavar="DIR", help="peft adapter_model.safetensors + adapter_config.json")
    p.add_argument("--onnx", metavar="FILE.onnx",
                   help="ONNX graph (merged where the method merges), checked with onnxruntime (vistune[onnx])")
    p.set_defaults(func=cmd_export, device="cpu", deploy=False)
