"""lorakit.options: fields declared once become flags; the string parsers of the command line."""

import argparse
import dataclasses

import pytest

from lorakit import options as opt


@dataclasses.dataclass
class Inner:
    depth: int = opt.option(3, "how deep")


@dataclasses.dataclass
class Outer:
    name: str = opt.option("x", "a name", flag="--title", aliases=("--old-title",))
    ratio: float | None = opt.option(None, "a ratio", default_text="the preset's")
    on: bool = opt.option(False, "switch it on")
    maybe: bool | None = opt.option(None, "three states")
    inner: Inner = opt.group(Inner, "the inner group")


def parse(*args):
    p = argparse.ArgumentParser()
    opt.add_flags(p, Outer)
    return opt.from_flags(Outer, p.parse_args(list(args))), p


def test_flags_fill_the_dataclass_and_the_rest_keep_its_defaults():
    cfg, p = parse("--title", "y", "--depth", "5", "--no-maybe")
    assert cfg == Outer(name="y", maybe=False, inner=Inner(depth=5))
    assert parse()[0] == Outer()
    assert parse("--old-title", "z")[0].name == "z"  # a hidden older spelling
    text = p.format_help()
    assert "a name (default: x)" in text and "a ratio (default: the preset's)" in text and "--old-title" not in text
    assert "the inner group:" in text and "how deep (default: 3)" in text


def test_flatten_and_spelling():
    assert opt.flatten(Outer, dataclasses.asdict(Outer()))["inner.depth"] == 3
    assert opt.spelling(Outer, "name") == "--title" and opt.spelling(Outer, "inner.depth") == "--depth"


def test_a_field_without_option_is_found():
    @dataclasses.dataclass
    class Bare:
        n: int = 1

    assert opt.fields_without_help(Bare) == ["n"]


@pytest.mark.parametrize("text,value", [
    ("attn-qv", "attn-qv"), ("k_proj", ["k_proj"]), ("q_proj,v_proj", ["q_proj", "v_proj"]),
    (r"model\.layers\.0\..*", r"model\.layers\.0\..*"), ("layers.0.mlp", ["layers.0.mlp"]),
])
def test_names_or_regex(text, value):
    assert opt.parse_names(text) == value


def test_parsers():
    assert opt.parse_layers("0-2,5") == [0, 1, 2, 5]
    assert opt.parse_keep_ratio("v_proj=0.5,o_proj=0.6") == {"v_proj": 0.5, "o_proj": 0.6}
    assert opt.parse_svd_rank("balanced") == "balanced" and opt.parse_svd_rank("3") == 3
    assert opt.parse_alpha_pattern("q_proj=8") == {"q_proj": 8.0}
    assert opt.parse_name_list("") == [] and opt.parse_regexes("a,b") == ["a", "b"]
    for bad, parse in (("0-x", opt.parse_layers), ("half", opt.parse_keep_ratio), ("q=", opt.parse_rank_pattern)):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_rank_pattern_from_an_advice_file(tmp_path):
    path = tmp_path / "advice.json"
    path.write_text('{"rank_pattern": {"query": 4}, "tol": 0.5}')
    assert opt.parse_rank_pattern(str(path)) == {"query": 4}
    path.write_text('{"rank_pattern": [1]}')
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        opt.parse_rank_pattern(str(path))


@pytest.mark.parametrize("parse,text,value", [
    (opt.positive_int, "3", 3), (opt.positive_int, " 12 ", 12),
    (opt.seed_int, "0", 0), (opt.seed_int, str(2**63 - 1), 2**63 - 1), (opt.positive_float, "1e-3", 1e-3),
    (opt.finite_float(0), "0", 0.0), (opt.finite_float(0, 1, lo_open=True), "1", 1.0),
    (opt.finite_float(0, 1, hi_open=True), "0", 0.0),
])
def test_number_parsers_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse,text,message", [
    (opt.positive_int, "0", "0 is not a positive integer; give 1 or more"),
    (opt.positive_int, "-1", "-1 is not a positive integer; give 1 or more"),
    (opt.positive_int, "1.5", "'1.5' is not a positive integer; give 1 or more"),
    (opt.positive_int, "x", "'x' is not a positive integer"),
    (opt.seed_int, "-1", "-1 is not a seed; give an integer from 0 to 2**63 - 1"),
    (opt.seed_int, str(2**63), "is not a seed"),
    (opt.positive_float, "0", "0 is not a finite number > 0"),
    (opt.positive_float, "nan", "nan is not a finite number > 0"),
    (opt.positive_float, "inf", "inf is not a finite number > 0"),
    (opt.finite_float(0), "-0.5", "-0.5 is not a finite number >= 0"),
    (opt.finite_float(0), "1e400", "1e400 is not a finite number >= 0"),
    (opt.finite_float(0, 1, lo_open=True), "0", "0 is not a number in (0, 1]"),
    (opt.finite_float(0, 1, lo_open=True), "1.5", "1.5 is not a number in (0, 1]"),
    (opt.finite_float(0, 1, hi_open=True), "1", "1 is not a number in [0, 1)"),
    (opt.finite_float(0, 1, hi_open=True), "half", "'half' is not a number in [0, 1)"),
])
def test_number_parsers_refuse(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value) == message or message in str(info.value)


def test_a_refused_number_is_one_line_naming_the_flag(capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["eval", "--adapter", "x", "--batch-size", "-1"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err == "lorakit: error: argument --batch-size: -1 is not a positive integer; give 1 or more (see: lorakit eval --help)\n"
