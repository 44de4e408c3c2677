"""One parser for a list typed as text (``core.lists.split_list``), and the places that read one
agree on an empty value and on whitespace: the CLI's ``--blocks``, a recipe's ``blocks``/``after``,
the Python API's ``blocks=``, ``--target`` and a zoo sweep's ``models``."""

from __future__ import annotations

import pytest

from attnsurgeon.cli.options import parse_globs
from attnsurgeon.core.errors import AttnSurgeonError
from attnsurgeon.core.lists import split_list
from attnsurgeon.graph.parts import parse_target
from attnsurgeon.planning.schema import globs
from attnsurgeon.rewriting.apply import make_spec


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", []),
        (" , ,", []),
        ("layer3.*", ["layer3.*"]),
        (" layer3.* ,layer4.2 , ", ["layer3.*", "layer4.2"]),
        (["layer3.*", " layer4.2 ", " "], ["layer3.*", "layer4.2"]),
        (("a", "b"), ["a", "b"]),
        (["a", 3], ["a", 3]),  # not a string: the caller rejects it
    ],
)
def test_split_list(value, expected):
    assert split_list(value) == expected


@pytest.mark.parametrize("value", [" layer3.* ,layer4.2 ", ["layer3.*", " layer4.2"]])
def test_every_reader_strips_the_same_way(value):
    expected = ["layer3.*", "layer4.2"]
    assert globs(value, "blocks", "block-name") == expected
    assert make_spec("se", blocks=value).blocks == expected
    assert make_spec("se", after=value).after == expected
    assert parse_target(value) == expected
    if isinstance(value, str):
        assert parse_globs(value) == expected


@pytest.mark.parametrize("empty", ["", " , "])
def test_an_empty_list_is_an_error_not_every_block(empty):
    with pytest.raises(AttnSurgeonError, match="--blocks"):
        parse_globs(empty)
    with pytest.raises(AttnSurgeonError, match="blocks: expected a list"):
        globs(empty, "blocks", "block-name")
    with pytest.raises(AttnSurgeonError, match="blocks: expected a list"):
        make_spec("se", blocks=empty)
    with pytest.raises(AttnSurgeonError, match="after: expected a list"):
        make_spec("se", after=empty)
    assert parse_target(empty) is None  # no --target: the whole model


def test_none_means_not_given():
    assert parse_globs(None) is None and globs(None, "blocks", "block-name") is None
    assert make_spec("se").blocks is None and parse_target(None) is None


def test_a_zoo_sweep_reads_models_the_same_way():
    from attnsurgeon.planning.recipes import parse_recipe

    configurations = [{"name": "se", "insertions": [{"attn": "se"}]}]
    recipe = parse_recipe({"models": " resnet18 , , resnet34", "configurations": configurations}, "t")
    assert recipe.models == ["resnet18", "resnet34"]
    with pytest.raises(AttnSurgeonError, match="models"):
        parse_recipe({"models": " , ", "configurations": configurations}, "t")
