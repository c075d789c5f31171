"""The one ``--set [METHOD.]KEY=VALUE`` grammar (vistune.options), for `vistune bench` and `vistune train`."""
from __future__ import annotations

import pytest

from vistune.errors import VistuneError
from vistune.options import OptionSets, parse_sets

METHODS = ["adapter", "linear", "mlp-2"]


def test_bare_pairs_apply_to_every_method_and_prefixed_ones_to_theirs():
    sets = parse_sets(["epochs=30", "adapter.reduction=8", "mlp-2.lr_grid=0.1,0.5"], METHODS)
    assert sets == OptionSets(shared={"epochs": "30"},
                              by_method={"adapter": {"reduction": "8"}, "mlp-2": {"lr_grid": "0.1,0.5"}})
    assert sets.for_method("adapter") == {"epochs": "30", "reduction": "8"}
    assert sets.for_method("linear") == {"epochs": "30"}
    assert sets.for_method("mlp-2") == {"epochs": "30", "lr_grid": "0.1,0.5"}


def test_a_method_pair_beats_a_bare_one_in_either_order_and_the_last_repeat_counts():
    for pairs in (["epochs=5", "linear.epochs=30"], ["linear.epochs=30", "epochs=5"]):
        sets = parse_sets(pairs, METHODS)
        assert sets.for_method("linear") == {"epochs": "30"} and sets.for_method("adapter") == {"epochs": "5"}
    assert parse_sets(["r=2", "r=4", "adapter.r=6", "adapter.r=8"], METHODS).for_method("adapter") == {"r": "8"}


def test_values_keep_their_text_and_spaces_around_parts_are_dropped():
    sets = parse_sets([" adapter . side_network = resnet10t.a1_in1k ", "note=a=b", "empty="], METHODS)
    assert sets.by_method == {"adapter": {"side_network": "resnet10t.a1_in1k"}}
    assert sets.shared == {"note": "a=b", "empty": ""}
    assert parse_sets(None, METHODS) == parse_sets([], METHODS) == OptionSets()


@pytest.mark.parametrize("pair", ["reduction", "=8", " =8", "adapter.=8", ".reduction=8", "adapter."])
def test_malformed_pairs_say_what_the_grammar_is(pair):
    with pytest.raises(VistuneError, match=r"is not key=value \(KEY=VALUE or METHOD.KEY=VALUE\)") as e:
        parse_sets([pair], METHODS)
    assert repr(pair) in e.value.what
    assert "--set" in e.value.fix and "adapter." in e.value.fix and "every method in --methods" in e.value.fix


def test_an_unknown_method_prefix_names_the_methods_and_suggests_one():
    with pytest.raises(VistuneError, match="names method 'adaptr', which is not in --methods") as e:
        parse_sets(["adaptr.reduction=8"], METHODS)
    assert "Did you mean 'adapter'?" in e.value.what
    assert "adapter, linear, mlp-2" in e.value.fix and "--set reduction=8 for every method" in e.value.fix
    with pytest.raises(VistuneError, match="'bias', which is not in --methods \\(adapter,linear,mlp-2\\)"):
        parse_sets(["epochs=3", "bias.epochs=3"], METHODS)


def test_the_train_command_form_one_method():
    """`vistune train --method lora --set r=8 --set lora.alpha=16`; another method's prefix is refused."""
    sets = parse_sets(["r=8", "lora.alpha=16"], ["lora"], methods_flag="--method")
    assert sets.for_method("lora") == {"r": "8", "alpha": "16"}
    with pytest.raises(VistuneError, match="names method 'adapter', which is not in --method \\(lora\\)") as e:
        parse_sets(["adapter.reduction=8"], ["lora"], methods_flag="--method")
    assert "--set reduction=8 for every method in --method" in e.value.fix
    with pytest.raises(VistuneError, match="every method in --method\\)"):
        parse_sets(["r"], ["lora"], methods_flag="--method")
