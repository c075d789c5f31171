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
