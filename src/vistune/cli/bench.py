"""`vistune bench` and `vistune report`: their arguments (the commands themselves: vistune.bench.cli)."""
from __future__ import annotations

from .common import add_backbone_args, subparser


def cmd_bench(args) -> int:
    from ..bench.cli import cmd_bench as run

    return run(args)


def cmd_report(args) -> int:
    from ..bench.cli import cmd_report as run

    return run(args)


def add_parsers(sub) -> None:
    p = subparser(sub, "bench", help="benchmark methods on a suite of tasks (VPT protocol: select lr×wd on val, "
                                     "retrain with several seeds, report test top-1); resumable")
    p.add_argument("--suite", required=True, metavar="S",
                   help="built-in suite (offline-mini, vtab-1k, fgvc) or the path of a suite .toml file")
    p.add_argument("--methods", required=True, metavar="M,M,…",
                   help="comma-separated methods, e.g. linear,bias,adapter; distill:METHOD trains METHOD by "
                        "distillation from --teacher")
    add_backbone_args(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="bench folder: results.sqlite, runs/<task>/<method>/seed<k>/, report.md; re-run to resume")
    p.add_argument("--data-root", metavar="R", help="folder holding <task>/ folders (vtab-1k, fgvc)")
    p.add_argument("--tasks", metavar="T,T,…", help="only these tasks of the suite")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs of every run (default: the suite's)")
    p.add_argument("--lr-grid", metavar="LR,LR,…", help="base lrs searched on val (default: the suite's)")
    p.add_argument("--wd-grid", metavar="WD,WD,…", help="weight decays searched on val (default: the suite's)")
    p.add_argument("--seeds", metavar="S,S,…", help="seeds of the final runs (default: the suite's)")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="input size in pixels (default: the suite's, else the backbone's pretrained size)")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per step (default: the suite's)")
    p.add_argument("--test-size", type=int, metavar="N", help="fixed stratified test subset (default: the suite's)")
    p.add_argument("--teacher", metavar="PATH",
                   help="distill:METHOD runs: the teacher artifact of each task, e.g. teachers/{task} ({task}: the "
                        "task's name, {root}: --data-root); default: the suite's [distill] teacher")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="method option (adapter.reduction=8) or per-method epochs/batch_size/optimizer/"
                        "warmup_epochs/lr_grid/wd_grid (linear.epochs=30); a bare KEY=VALUE applies to every "
                        "method; repeatable")
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
    p.add_argument("--quiet", action="store_true",
                   help="nothing but errors: no progress bars, per-run lines or heartbeat lines (printed once a "
                        "minute of a long run where stdout is no terminal)")
    p.set_defaults(func=cmd_bench)

    p = subparser(sub, "report", help="write the Markdown report + accuracy-vs-params plot of a bench folder")
    p.add_argument("dir", metavar="DIR", help="the --out folder of `vistune bench`")
    p.add_argument("--out", metavar="FILE", help="report path (default: DIR/report.md); the plot goes to "
                                                 "DIR/accuracy_vs_params.png")
    p.set_defaults(func=cmd_report)
