"""`vistune distill`: train a student (any backbone, any method) by knowledge distillation from a vistune artifact."""
from __future__ import annotations

from .common import add_backbone_args, add_data_args, add_train_args, console, method_options, notify, subparser, \
    train_config
from .train import _print_metrics


def cmd_distill(args) -> int:
    from ..distill import DistillJob, run_distill
    from ..methods.procedures import procedure_config
    from ..run import Job
    from ..training import distributed

    settings = {"temperature": args.temperature, "alpha": args.alpha, "feature_loss": args.feature_loss,
                "feature_weight": args.feature_weight, "cache_teacher": not args.online_teacher}
    config = procedure_config("distill", settings)  # a bad setting fails before anything loads
    job = Job(backbone=args.backbone, method=args.method, data=args.data, out=args.out,
              overrides=method_options(args.set, args.method), checkpoint=args.checkpoint,
              random_init=args.random_init, image_size=args.image_size, normalization=args.normalization,
              augment=args.augment, train_size=args.train_size, val_size=args.val_size, data_seed=args.data_seed,
              train=train_config(args))
    with distributed.process_group(args.device):  # several processes under torchrun; else a no-op
        metrics = run_distill(DistillJob(job, args.teacher, config, args.unlabelled), resume=args.resume,
                              progress=not args.quiet, notify=notify)
        if not distributed.is_main():
            return 0
    metrics.pop("model")
    _print_metrics(metrics)
    d = metrics["distillation"]
    teacher_test = d["teacher_test_accuracy"]
    console.print(f"teacher {d['teacher']['method']} on {d['teacher']['backbone']}: val accuracy "
                  f"{d['teacher_val_accuracy']:.4f}, test accuracy "
                  f"{'-' if teacher_test is None else f'{teacher_test:.4f}'} (teacher outputs {d['teacher_outputs']})")
    console.print(f"artifact: {args.out}/adapter.safetensors, adapter.json (names the teacher), metrics.json")
    return 0


def add_parsers(sub) -> None:
    p = subparser(sub, "distill", help="train a student by knowledge distillation from a vistune artifact "
                                       "(remapping tuning)",
                  description="Knowledge distillation (Hinton et al. 2015): the student — any backbone, any method "
                              "— minimises α·CE(labels) + (1−α)·T²·KL(teacher ‖ student at temperature T), plus "
                              "optionally a FitNets-style feature term. The teacher is the --out folder of any "
                              "vistune run on the same classes. Writes the student method's normal artifact. "
                              "docs/methods.md, 'Remapping tuning — knowledge distillation'.")
    p.add_argument("--teacher", required=True, metavar="RUN_DIR",
                   help="the teacher: the --out folder of a vistune run (any backbone, any method), same classes")
    add_backbone_args(p, flag="--student")
    p.add_argument("--method", required=True, metavar="M", help="the student's method (see `vistune methods`)")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="student method option, repeatable (see `vistune methods --details`)")
    add_data_args(p)
    p.add_argument("--out", required=True, metavar="OUT", help="folder for the student's artifact and metrics.json")
    p.add_argument("--temperature", type=float, default=4.0, metavar="T", help="softmax temperature of the KD term")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A",
                   help="weight of the label cross-entropy; the KD term gets 1−A")
    p.add_argument("--feature-loss", choices=["none", "mse", "cosine"], default="none",
                   help="also match the teacher's pooled feature through a learned linear projector (FitNets' "
                        "hint regressor; trained, not saved)")
    p.add_argument("--feature-weight", type=float, default=1.0, metavar="B", help="weight of the feature term")
    p.add_argument("--unlabelled", metavar="DIR",
                   help="a folder of images without labels (any layout) added to the training set: they add only "
                        "the distillation terms")
    p.add_argument("--online-teacher", action="store_true",
                   help="run the teacher on every batch even without augmentation (default: once per image, "
                        "cached; the same training)")
    add_train_args(p)
    p.add_argument("--augment", action="store_true",
                   help="random-resized-crop + flip, the same crop for student and teacher (the teacher then runs "
                        "on every batch)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_distill)
