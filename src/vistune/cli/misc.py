"""`vistune demo`, `vistune pretrain` and `vistune data`: the offline demo, vistune's own backbones, data sets."""
from __future__ import annotations

from ..errors import VistuneError
from .common import console, subparser


def cmd_pretrain(args) -> int:
    from ..pretrain import pretrain

    card = pretrain(args.recipe, args.data, args.out, epochs=args.epochs, device=args.device,
                    progress=not args.quiet, seed=args.seed)
    console.print(f"{card['name']}: CIFAR-10 test top-1 {card['test_top1']:.4f}, {card['params']:,} params, "
                  f"{card['wall_seconds']:.0f} s on {card['hardware']}; wrote {args.out}/{card['weights']} + card")
    return 0


def cmd_data_vtab(args) -> int:
    from pathlib import Path

    from ..data import vtab_download as vtab

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
    from ..demo import run_demo

    run_demo(out=args.out, quick=args.quick, device=args.device, progress=not args.quiet)
    return 0


def add_parsers(sub) -> None:
    p = subparser(sub, "data", help="prepare benchmark data sets")
    data_sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    p = subparser(data_sub, "vtab", help="VTAB-1k's 19 tasks as list-file folders (train800/val200/test), "
                                         "through tensorflow-datasets (pip install 'vistune[vtab]')")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for <task>/ folders (the bench --data-root)")
    p.add_argument("--download", action="store_true",
                   help="download and write missing tasks (needs the network); without it: verify DIR's tasks "
                        "against their manifest checksums")
    p.add_argument("--tasks", metavar="T,T,…", help="only these tasks (default: all 19)")
    p.add_argument("--tfds-dir", metavar="DIR", help="tensorflow-datasets' data_dir (default: tfds's, ~/tensorflow_datasets)")
    p.set_defaults(func=cmd_data_vtab)

    p = subparser(sub, "demo", help="adapt the real ImageNet EfficientNet-Lite0 to a real offline dataset "
                                    "with several methods and print a comparison table")
    p.add_argument("--out", default="vistune-demo", help="folder for the artifacts")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 2 epochs per method at 64 px, 200 test images")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, nor the line per epoch printed instead where stderr is no terminal "
                        "(the line per method stays)")
    p.set_defaults(func=cmd_demo)

    p = subparser(sub, "pretrain", help="pretrain vistune's own small ViT/Swin from scratch (e.g. on CIFAR-10)")
    p.add_argument("recipe", help="vistune/vit-tiny-cifar10 or vistune/swin-tiny-cifar10")
    p.add_argument("--data", required=True, help="e.g. cifar10:../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--out", required=True, help="folder for <name>.safetensors and its model card <name>.json")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pretraining run")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pretrain)
