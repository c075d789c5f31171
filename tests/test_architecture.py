"""The package's structure: layers import one way, no import cycles, the contract and registry hold.

The import graph is read from the source with ast (module-level AND function-level imports), so a lazy
import inside a function counts as much as one at the top of a file."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vistune
from vistune.methods import METHODS, Method, ModuleTuner, TokenTuner

SRC = Path(vistune.__file__).parent
# lowest first: a module may import its own layer (without cycles) and the layers below it, never above
LAYERS = [
    {"_io", "errors", "options", "output"},
    {"backbones"},
    {"remapping"},
    {"data"},
    {"methods"},
    {"artifacts", "merge", "onnx_export"},
    {"training"},
    {"run", "pretrain"},
    {"demo", "distill", "multitask"},
    {"bench"},
    {"serve"},
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level module {top!r} has no layer in LAYERS; add it where it belongs")


def _import_graph() -> dict[str, set[str]]:
    files = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                targets = [name] + [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                # importing the package root (its __version__) or one's own parent package is no dependency
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_import_graph()) == []


def test_layers_import_one_way():
    graph = _import_graph()
    upward = sorted(f"{a} -> {b}" for a, bs in graph.items() if a != "vistune" for b in bs
                    if b != "vistune" and _layer(b) > _layer(a))
    assert upward == []


def test_every_method_meets_the_contract():
    for name, info in METHODS.items():
        cls = info.method_class
        assert issubclass(cls, Method) and cls.info is info
        assert cls.default_optimizer in ("sgd", "adamw")
        assert info.kinds, f"{name}: no tuner kind"
        if issubclass(cls, TokenTuner):
            assert not cls.supports_segmentation and not cls.mergeable
            assert cls.token_seam in info.needs
        if cls.head_only:
            assert not issubclass(cls, (TokenTuner, ModuleTuner))
        for key, (_, _, text) in info.config_class.fields_help().items():
            assert text, f"{name}: option {key!r} has no help text"


def test_the_contract_is_enforced_at_registration():
    from vistune.methods import register

    class Broken(TokenTuner):
        supports_segmentation = True

    with pytest.raises(TypeError, match="can neither segment nor merge"):
        register("broken-for-test", category="prompt", description="x")(Broken)
    assert "broken-for-test" not in METHODS

    class MisspeltFamily(ModuleTuner):
        default_lrs_by_family = {"cnn": {"adamw": 0.02}}  # the CNNs' view is "generic"

    with pytest.raises(TypeError, match=r"families \['cnn'\] that no view has"):
        register("misspelt-family-for-test", category="parameter", description="x")(MisspeltFamily)
    assert "misspelt-family-for-test" not in METHODS


def test_top_level_api():
    for name in ("load_backbone", "adapt", "make_config", "train", "evaluate", "save_artifact", "load_artifact",
                 "run_job", "Job", "TrainConfig"):
        obj = getattr(vistune, name)
        assert obj.__doc__, f"vistune.{name} has no docstring"
    assert set(vistune.__all__) <= set(dir(vistune))
    with pytest.raises(AttributeError):
        vistune.no_such_thing
