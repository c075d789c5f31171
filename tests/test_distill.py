"""Knowledge distillation (`vistune distill`, the remapping family's procedure): the loss, the teacher cache, the
unlabelled images, the artifact, the registry and the bench."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_SIZE, TINY, tiny_backbone, tinted_class_folder
from vistune.artifacts import META, load_artifact
from vistune.bench import BenchOptions, parse_suite, run_bench
from vistune.cli import main
from vistune.distill import DistillJob, PairedViews, run_distill
from vistune.errors import VistuneError
from vistune.merge import merge
from vistune.methods import adapt
from vistune.methods.procedures import PROCEDURES, DistillConfig, procedure_config, split_label
from vistune.run import Job, read_metrics, run_job
from vistune.training import TrainConfig, train
from vistune.training.distill import UNLABELLED, Distillation, distillation_loss
from vistune.training.objective import CrossEntropy

STUDENT, STUDENT_KW = TINY["mobilenet"]
TEACHER, TEACHER_KW = TINY["vit"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 tinted classes × 8 train (6 train / 2 val each after the split) and 4 test images."""
    return tinted_class_folder(tmp_path_factory.mktemp("distill-data"), 8, 4, seed=1)


def _train_cfg(**kw) -> TrainConfig:
    # SGD, as these tests were written for (the methods' own defaults are AdamW now): a DDP run equals one process
    # to float noise under SGD, while Adam's normalised steps amplify that noise in near-zero gradients
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 0.5, "optimizer": "sgd", "device": "cpu", "seed": 3,
                          **kw})


def student_job(data: Path, out: Path | None, method: str = "linear", **kw) -> Job:
    return Job(backbone=STUDENT, method=method, data=str(data), out=None if out is None else str(out),
               random_init=True, model_kwargs=STUDENT_KW, image_size=IMAGE_SIZE, train=_train_cfg(), **kw)


@pytest.fixture(scope="module")
def teacher(folder, tmp_path_factory) -> Path:
    """A tiny ViT + adapter teacher trained on the folder (another family and method than the students)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_job(Job(backbone=TEACHER, method="adapter", data=str(folder), out=str(out), overrides={"reduction": 4},
                random_init=True, model_kwargs=TEACHER_KW, image_size=IMAGE_SIZE, train=_train_cfg(epochs=3)),
            progress=False)
    return out


# ------------------------------------------------------------------------------------------------ the loss
def _reference(s, t, y, T, alpha):
    """α·CE over labelled + (1−α)·T²·mean_i Σ_c p_t (log p_t − log p_s), written out with exp/log."""
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    labelled = [i for i, c in enumerate(y) if c != UNLABELLED]
    ce = -np.mean([np.log(softmax(s)[i, y[i]]) for i in labelled]) if labelled else 0.0
    ps, pt = softmax(s / T), softmax(t / T)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    return alpha * ce + (1 - alpha) * T ** 2 * kl


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (4.0, 0.3), (2.5, 0.0), (3.0, 1.0)])
def test_loss_is_hintons_formula(T, alpha):
    s = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 1.5, 0.0], [1.0, 1.0, 1.0]]
    t = [[3.0, 0.0, -1.0], [0.0, 0.5, 2.0], [1.0, 2.0, -3.0], [0.2, -0.4, 2.2]]
    y = [0, 2, UNLABELLED, 1]
    got = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(_reference(s, t, y, T, alpha), rel=1e-5, abs=1e-6)


def test_feature_terms():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    p, f = torch.randn(5, 8), torch.randn(5, 8)
    base = distillation_loss(s, t, y, temperature=2.0, alpha=0.5)
    mse = distillation_loss(s, t, y, temperature=2.0, alpha=0.5, projected=p, teacher_features=f,
                            feature_loss="mse", feature_weight=0.7)
    cos = distillation_loss(s, t, y, temperature=2.0, alpha=0.5, projected=p, teacher_features=f,
                            feature_loss="cosine", feature_weight=2.0)
    assert (mse - base).item() == pytest.approx(0.7 * ((p - f) ** 2).mean().item(), rel=1e-5)
    cosine = (p * f).sum(1) / (p.norm(dim=1) * f.norm(dim=1))
    assert (cos - base).item() == pytest.approx(2.0 * (1 - cosine).mean().item(), rel=1e-5)


def test_unlabelled_items_add_only_the_distillation_term():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    y = torch.tensor([0, UNLABELLED, 2, UNLABELLED])
    # whatever label an unlabelled item would have had, nothing changes; a batch of unlabelled items is pure KD
    other = torch.tensor([0, 1, 2, 0])
    assert distillation_loss(s, t, y, temperature=2.0, alpha=0.6) != distillation_loss(s, t, other, temperature=2.0,
                                                                                        alpha=0.6)
    none = torch.full((4,), UNLABELLED)
    kd_only = distillation_loss(s, t, none, temperature=2.0, alpha=0.6)
    assert kd_only.item() == pytest.approx(0.4 * _reference(s.detach(), t, [UNLABELLED] * 4, 2.0, 0.0), rel=1e-5)
    # the gradient an unlabelled row gets is the KD term's alone
    loss = distillation_loss(s, t, y, temperature=2.0, alpha=0.6)
    (g,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_(True)
    kd = distillation_loss(s2, t, none, temperature=2.0, alpha=0.0) * 0.4
    (g_kd,) = torch.autograd.grad(kd, s2)
    assert torch.allclose(g[1], g_kd[1], atol=1e-6) and torch.allclose(g[3], g_kd[3], atol=1e-6)
    assert not torch.allclose(g[0], g_kd[0], atol=1e-4)


def test_config_is_validated_once():
    with pytest.raises(VistuneError, match="temperature"):
        DistillConfig(temperature=0.0)
    with pytest.raises(VistuneError, match="alpha"):
        procedure_config("distill", {"alpha": "1.5"})
    with pytest.raises(VistuneError, match="no distillation term"):
        procedure_config("distill", {"alpha": "1"})
    assert procedure_config("distill", {"feature_loss": "cosine"}).feature_loss == "cosine"


def test_cli_defaults_are_the_configs():
    """`vistune distill --help` shows the argparse defaults: they must be DistillConfig's (the library's)."""
    from vistune.cli import build_parser

    args = build_parser().parse_args(["distill", "--teacher", "t", "--student", "s", "--method", "linear",
                                      "--data", "d", "--out", "o"])
    default = DistillConfig()
    assert (args.temperature, args.alpha, args.feature_loss, args.feature_weight, not args.online_teacher) == (
        default.temperature, default.alpha, default.feature_loss, default.feature_weight, default.cache_teacher)
    assert args.unlabelled is None and not args.augment


# -------------------------------------------------------------------------------------- the teacher cache
def _distilled(teacher_dir: Path, folder: Path, cache: bool, feature_loss: str = "mse"):
    """A tiny student trained by distillation through `train()` directly; returns (state, history)."""
    from vistune.run import prepare_job, transforms_for
    from vistune.distill import _teacher_transforms

    setup = prepare_job(student_job(folder, None, method="bias"))
    teacher_model, meta = load_artifact(teacher_dir)
    plain = _teacher_transforms(meta)[0]
    torch.manual_seed(0)
    model = adapt(setup.backbone, setup.config, num_classes=3)
    cfg = DistillConfig(feature_loss=feature_loss, cache_teacher=cache)
    objective = Distillation(teacher_model, cfg, student_dim=model.backbone.feature_dim,
                             teacher_dim=teacher_model.backbone.feature_dim,
                             teacher_inputs=setup.data.train.with_transform(plain))
    result = train(model, setup.data.train.with_transform(transforms_for({**setup.preprocessing})[1]),
                   setup.data.val, _train_cfg(), progress=False, objective=objective)
    return model.tuned_state_dict(), result.history, objective


def test_cached_and_online_teacher_train_the_same(teacher, folder):
    cached, h_cached, obj_cached = _distilled(teacher, folder, cache=True)
    online, h_online, obj_online = _distilled(teacher, folder, cache=False)
    assert obj_cached.cached and not obj_online.cached
    for k in cached:
        assert torch.allclose(cached[k], online[k], atol=1e-5), k
    for a, b in zip(h_cached, h_online):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # the projector trained (it is the objective's, not the model's)
    assert obj_cached.trainable is not None and not any(k.startswith("trainable") for k in cached)


def test_default_objective_is_the_trainers_cross_entropy(folder):
    from vistune.run import prepare_job

    setup = prepare_job(student_job(folder, None, method="bias"))
    states = []
    for objective in (None, CrossEntropy()):
        torch.manual_seed(0)
        model = adapt(setup.backbone, setup.config, num_classes=3)
        train(model, setup.data.train, setup.data.val, _train_cfg(epochs=1), progress=False, objective=objective)
        states.append(model.tuned_state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resume_refuses_another_teacher_or_settings(teacher):
    teacher_model, _ = load_artifact(teacher)
    a = Distillation(teacher_model, DistillConfig(), student_dim=8, teacher_dim=8, teacher_inputs=None,
                     identity={"tensors_sha256": "a"})
    b = Distillation(teacher_model, DistillConfig(temperature=2.0), student_dim=8, teacher_dim=8,
                     teacher_inputs=None, identity={"tensors_sha256": "a"})
    a.load_state_dict(a.state_dict())
    with pytest.raises(VistuneError, match="another teacher or other distillation settings"):
        b.load_state_dict(a.state_dict())


def test_paired_views_share_one_crop():
    from vistune.data import ArrayDataset, build_transforms

    rng = np.random.default_rng(0)
    images = ArrayDataset(rng.integers(0, 255, (3, 40, 40, 3)).astype(np.uint8), [0, 1, 2])
    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    a = build_transforms(cfg, image_size=24)[1]
    b = build_transforms({**cfg, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}, image_size=24)[1]
    views = PairedViews(images, a, b)
    torch.manual_seed(0)
    first = [views[i] for i in range(3)]
    for x_s, y, x_t in first:
        assert torch.allclose(x_s, (x_t - 0.5) / 0.5, atol=1e-6)  # the same pixels, each model's normalisation
    torch.manual_seed(1)
    assert not torch.allclose(views[0][0], first[0][0])  # a new crop per access


# ------------------------------------------------------------------------------- the procedure end to end
def test_distill_cli_writes_a_normal_artifact_that_names_the_teacher(teacher, folder, tmp_path, capsys):
    out = tmp_path / "student"
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "any" / "depth").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(unlabelled / "any" / "depth" / f"{i}.png")
    rc = main(["distill", "--teacher", str(teacher), "--student", STUDENT, "--random-init", "--method", "bias",
               "--data", str(folder), "--image-size", str(IMAGE_SIZE), "--out", str(out),
               "--epochs", "1", "--batch-size", "4", "--lr", "0.5", "--device", "cpu", "--temperature", "3",
               "--alpha", "0.25", "--feature-loss", "cosine", "--unlabelled", str(unlabelled), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / META).read_text())
    teacher_meta = json.loads((teacher / META).read_text())
    d = meta["distillation"]
    assert meta["method"] == "bias" and d["procedure"] == "distill"
    assert d["teacher"]["tensors_sha256"] == teacher_meta["tensors_sha256"]
    assert d["teacher"]["meta_sha256"] == teacher_meta["meta_sha256"]
    assert d["teacher"]["method"] == "adapter" and d["teacher"]["backbone"] == TEACHER
    assert d["settings"] == {"temperature": 3.0, "alpha": 0.25, "feature_loss": "cosine", "feature_weight": 1.0,
                             "cache_teacher": True}
    assert d["unlabelled"]["images"] == 6 and d["labelled_images"] == 19  # 24 images less the 5 of val
    assert not any("projector" in k or k.startswith("trainable") for k in meta["tensors"])  # not saved
    metrics = read_metrics(out)
    assert metrics["distillation"]["teacher"]["path"] == str(teacher.resolve())
    assert 0 <= metrics["distillation"]["teacher_test_accuracy"] <= 1
    # a normal artifact: reload → identical logits; eval, predict and merge work on it unchanged
    model, _ = load_artifact(out)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    reloaded, _ = load_artifact(out)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
        assert torch.allclose(merge(model)(x), model(x), atol=1e-4)
    assert main(["eval", "--adapter", str(out), "--data", str(folder), "--device", "cpu", "--quiet"]) == 0
    image = next((folder / "test" / "class0").iterdir())
    assert main(["predict", "--adapter", str(out), str(image), "--device", "cpu", "--quiet", "--json"]) == 0


def test_distill_with_augmentation_runs_the_teacher_online(teacher, folder, tmp_path):
    m = run_distill(DistillJob(student_job(folder, tmp_path / "aug", augment=True), str(teacher)), progress=False)
    assert m["distillation"]["teacher_outputs"] == "computed on every batch"
    assert (tmp_path / "aug" / META).is_file()


def test_class_name_mismatch_is_refused(teacher, folder, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    for split in ("train", "test"):
        (other / split / "class2").rename(other / split / "zebra")
    with pytest.raises(VistuneError, match="other classes") as e:
        run_distill(DistillJob(student_job(other, tmp_path / "s"), str(teacher)), progress=False)
    assert "zebra" in e.value.what and "class2" in e.value.what
    assert not (tmp_path / "s").exists()


def test_teacher_must_be_an_artifact(folder, tmp_path):
    with pytest.raises(VistuneError, match="not a vistune artifact"):
        run_distill(DistillJob(student_job(folder, tmp_path / "s"), str(tmp_path)), progress=False)
    with pytest.raises(VistuneError, match="no such folder") as e:
        run_distill(DistillJob(student_job(folder, tmp_path / "s"), str(tmp_path / "missing")), progress=False)
    assert "--out folder" in e.value.fix


# ---------------------------------------------------------------------------------------- registry, bench
def test_methods_lists_the_remapping_family(capsys):
    assert {"distill", "weight-selection", "growth"} <= set(PROCEDURES)
    assert all(p.category == "remapping" for p in PROCEDURES.values())
    assert main(["methods", "--markdown"]) == 0
    table = capsys.readouterr().out
    for name in ("distill", "weight-selection", "growth"):
        assert f"| `{name}` | remapping | procedure |" in table
    assert split_label("distill:partial-2")[1] == "partial-2"
    with pytest.raises(VistuneError, match="cannot run 'growth'"):
        split_label("growth:linear")
    with pytest.raises(VistuneError, match="unknown method"):
        split_label("distill:nope")


def test_bench_runs_distillation_with_a_teacher_per_task(teacher, folder, tmp_path):
    suite = parse_suite({
        "name": "tiny-distill",
        "defaults": {"image_size": IMAGE_SIZE, "epochs": 1, "batch_size": 4, "lr_grid": [0.5], "wd_grid": [0.0],
                     "seeds": [3], "train_size": 18, "val_size": 6},
        "tasks": [{"name": "folder", "group": "Natural", "data": str(folder)}],
        "distill": {"teacher": str(teacher.parent / "{task}"), "temperature": 2.0},
    })
    (teacher.parent / "folder").symlink_to(teacher)
    backbone = tiny_backbone("mobilenet")
    options = BenchOptions(suite, ["distill:linear"], backbone, tmp_path / "bench", device="cpu",
                           efficiency=False, progress=False)
    summary = run_bench(options)
    assert summary["executed"] == 2  # one selection run, one final run
    meta = json.loads((tmp_path / "bench" / "runs" / "folder" / "distill:linear" / "seed3" / META).read_text())
    assert meta["distillation"]["settings"]["temperature"] == 2.0 and meta["method"] == "linear"
    assert run_bench(options)["executed"] == 0  # stored: resumable like any run
    no_teacher = parse_suite({"name": "t", "tasks": [{"name": "folder", "group": "N", "data": str(folder)}]})
    with pytest.raises(VistuneError, match="no teacher is named"):
        run_bench(BenchOptions(no_teacher, ["distill:linear"], backbone, tmp_path / "b2", device="cpu"))
    assert math.isfinite(read_metrics(tmp_path / "bench" / "runs" / "folder" / "distill:linear" / "seed3")[
        "distillation"]["teacher_val_accuracy"])


# ------------------------------------------------------------------------------------------------------ DDP
def _ddp_distill(folder: Path):
    """A tiny student distilled (with the feature projector) from a random tiny teacher; (student, projector)."""
    from vistune.run import prepare_job

    setup = prepare_job(Job(backbone=TEACHER, method="bias", data=str(folder), random_init=True,
                            model_kwargs=TEACHER_KW, image_size=IMAGE_SIZE, train=_train_cfg()))
    torch.manual_seed(0)
    teacher_model = adapt(tiny_backbone("mobilenet"), "linear", num_classes=3).eval()
    model = adapt(setup.backbone, setup.config, num_classes=3)
    objective = Distillation(teacher_model, DistillConfig(feature_loss="mse"), student_dim=model.backbone.feature_dim,
                             teacher_dim=teacher_model.backbone.feature_dim, teacher_inputs=setup.data.train)
    initial = objective.trainable.weight.detach().clone()
    train(model, setup.data.train, setup.data.val, _train_cfg(), progress=False, objective=objective)
    assert not torch.allclose(initial, objective.trainable.weight)  # the projector trained
    return ({k: v.tolist() for k, v in model.tuned_state_dict().items()},
            {k: v.tolist() for k, v in objective.trainable.state_dict().items()})


def _ddp_worker(rank: int, port: int, folder: Path, out: Path) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=90))
    try:
        state, projector = _ddp_distill(folder)
        (out / f"rank{rank}.json").write_text(json.dumps({"state": state, "projector": projector}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distillation_under_ddp_trains_what_one_process_trains(folder, tmp_path):
    """2 gloo processes, each B/2 of every batch: the student and the projector (inside DDP's forward) end where
    one process ends (the teacher's cached logits are computed by each process for all items). Slow: two spawned
    processes import torch and vistune (3.7 min on the shared 2-core machine at load average ~15)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, folder, tmp_path), nprocs=2, join=True)
    state, projector = _ddp_distill(folder)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        for mine, theirs in ((state, got["state"]), (projector, got["projector"])):
            for k in mine:
                assert np.allclose(mine[k], theirs[k], rtol=1e-4, atol=1e-5), (r, k)
