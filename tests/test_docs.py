"""What README and the docs say about the code is checked against the code."""
from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import torch_threads
from vistune.cli.info import methods_markdown
from vistune.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_methods_table_is_the_registry():
    table = re.search(r"<!-- methods-table.*?-->\n(.*?)<!-- /methods-table -->", README, re.S).group(1).strip()
    assert table == methods_markdown(), "regenerate it: vistune methods --markdown"


def test_docs_methods_page_names_every_method():
    text = (ROOT / "docs" / "methods.md").read_text()
    missing = [name for name in METHODS if f"`{name}`" not in text]
    assert missing == []


def test_readme_python_example_runs_as_written(tmp_path):
    block = re.search(r"Python \(this block runs as written.*?```python\n(.*?)```", README, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with torch_threads(1):
            namespace: dict = {}
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "runs" / "digits-lora" / "adapter.safetensors").is_file()
    assert namespace["metrics"]["test_accuracy"] is not None
    result = namespace["vistune"].evaluate(namespace["reloaded"], namespace["test_set"])
    assert result["n"] == len(namespace["test_set"]) and 0.0 <= result["accuracy"] <= 1.0


def test_defaults_page_states_every_methods_default_optimizer_and_lrs():
    """docs/defaults.md's first table: each method once, with its default optimizer, its own base lr first and
    every family override as "**LR on CNNs**" (the generic view) or "**LR on ViTs**"."""
    from vistune.training import TrainConfig

    text = (ROOT / "docs" / "defaults.md").read_text()
    table = re.search(r"\| methods \| optimizer \|.*?\n\n", text, re.S).group(0).strip().splitlines()[2:]
    labels = {"generic": "CNNs", "vit": "ViTs"}
    cfg, seen = TrainConfig(), []
    for row in table:
        names, optimizer, lr, _ = (c.strip() for c in row.strip("|").split("|"))
        for name in names.split(", "):
            seen.append(name)
            cls = METHODS[name].method_class
            assert optimizer.split(",")[0].lower() == cfg.resolved_optimizer(cls), row
            assert float(re.match(r"[\d.]+", lr).group(0)) == cfg.default_lr(cls), row
            claims = re.findall(r"\*\*([\d.]+) on (\w+)\*\*", lr)
            overrides = {labels[f]: cfg.default_lr(cls, f) for f in cls.default_lrs_by_family}
            assert {where: float(v) for v, where in claims} == overrides, row
    assert sorted(seen) == sorted(METHODS)
