"""``--lr auto`` (training/lr_search.py): which candidates it tries, what it chooses and says, that the run after
the search is exactly the run at the chosen lr, and that metrics.json and the CLI show the search."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

import vistune.cli as cli_mod
from conftest import IMAGE_SIZE, TINY, tinted_class_folder
from vistune.errors import TrainingDiverged
from vistune.run import METRICS, Job, run_job
from vistune.training import TrainConfig
from vistune.training import lr_search


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def peaked(best: float, diverge_above: float = math.inf):
    """A probe whose val accuracy peaks at ``best`` and falls by 0.2 per decade; diverges above a limit."""
    def probe(lr):
        if lr > diverge_above:
            raise lr_search.ProbeDiverged("exploded")
        distance = abs(math.log10(lr / best))
        return 0.9 - 0.2 * distance, 0.4 + distance
    return probe


# ------------------------------------------------------------------------------------------ the search
def test_the_candidates_surround_the_default_and_the_best_is_chosen():
    found = lr_search.search(0.01, peaked(0.003), optimizer="adamw", steps=20, val_images=256)
    assert [c.lr for c in found.candidates] == [0.001, 0.00333, 0.01, 0.03, 0.1]
    assert found.chosen == 0.00333 and found.default_lr == 0.01
    text = "\n".join(found.lines())
    assert "lr 0.00333" in text and "← chosen" in text and "(method default)" in text
    assert "chose base lr 0.00333" in text and "20 steps" in text and "256 val images" in text


def test_the_range_grows_when_the_best_is_at_an_end_and_skips_diverged_lrs():
    found = lr_search.search(1.0, peaked(0.03, diverge_above=0.5), optimizer="adamw", steps=20, val_images=256)
    tried = {c.lr: c.status for c in found.candidates}
    assert tried[10.0] == tried[3.0] == tried[1.0] == "diverged" and tried[0.333] == "ok"
    assert min(tried) == 0.0111  # two ×3 steps below the five candidates
    assert found.chosen == 0.0333


def test_among_near_ties_the_lower_val_loss_wins():
    scores = {0.1: (0.80, 0.9), 0.03: (0.79, 0.5), 0.01: (0.70, 0.7), 0.00333: (0.6, 1.0), 0.001: (0.5, 1.2)}
    found = lr_search.search(0.01, lambda lr: scores[lr], optimizer="adamw", steps=20, val_images=256)
    assert found.chosen == 0.03  # 0.79 is within one standard error (0.025) of 0.80, with a lower loss
    assert "lowest val loss" in found.reason


def test_every_candidate_diverging_is_a_clear_error():
    with pytest.raises(TrainingDiverged) as e:
        lr_search.search(10.0, peaked(1e-3, diverge_above=1e-4), optimizer="sgd", steps=20, val_images=100)
    assert "every candidate base lr" in e.value.what and "diverged within 20 steps" in e.value.what
    assert "--lr 0.0111" in e.value.fix


# ------------------------------------------------------------------------------------------ in training
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tinted_class_folder(tmp_path_factory.mktemp("lr-auto"), n_train=16, n_test=4, seed=0)


def job(method, folder, out, lr, overrides=None) -> Job:
    arch, kwargs = TINY["vit"]
    return Job(backbone=arch, method=method, data=str(folder), out=str(out), overrides=overrides or {},
               random_init=True, model_kwargs=kwargs, image_size=IMAGE_SIZE,
               train=TrainConfig(epochs=2, batch_size=8, lr=lr, device="cpu", seed=1))


@pytest.mark.parametrize("method,overrides", [("linear", {}), ("adapter", {"reduction": 4})])
def test_auto_trains_exactly_what_the_chosen_lr_trains(method, overrides, folder, tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    lines = []
    auto = run_job(job(method, folder, tmp_path / "auto", "auto", overrides), backbone=backbone, progress=False,
                   notify=lines.append)
    search = auto["lr_search"]
    assert search["chosen"] in [c["lr"] for c in search["candidates"]] and len(search["candidates"]) >= 5
    assert auto["train_config"]["lr"] == "auto" and auto["train_config"]["base_lr"] == search["chosen"]
    assert any("--lr auto chose base lr" in line for line in lines)
    assert json.loads((tmp_path / "auto" / METRICS).read_text())["lr_search"] == search
    assert (tmp_path / "auto" / "lr_search.json").is_file()

    fixed = run_job(job(method, folder, tmp_path / "fixed", search["chosen"], overrides), backbone=backbone,
                    progress=False)
    assert fixed["lr_search"] is None
    no_time = [[{k: v for k, v in h.items() if k != "seconds"} for h in m["history"]] for m in (auto, fixed)]
    assert no_time[0] == no_time[1]
    a, b = auto["model"].tuned_state_dict(), fixed["model"].tuned_state_dict()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_mod.main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_cli_lr_auto_prints_the_candidates_and_the_choice(folder, tmp_path):
    rc, out, err = cli("train", "--backbone", "resnet10t", "--random-init", "--image-size", "32", "--method",
                       "linear", "--data", folder, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8",
                       "--lr", "auto", "--quiet")
    assert rc == 0, err
    assert "--lr auto:" in out and "--lr auto chose base lr" in out and "← chosen" in out
    assert json.loads((tmp_path / "run" / METRICS).read_text())["lr_search"]["chosen"] > 0


@pytest.mark.parametrize("value", ["fast", "0", "-1"])
def test_cli_lr_takes_a_positive_number_or_auto(value, folder, tmp_path):
    rc, _, err = cli("train", "--backbone", "resnet10t", "--random-init", "--method", "linear", "--data", folder,
                     "--out", tmp_path / "run", "--lr", value)
    assert rc == 2 and "--lr" in err and "auto" in err
