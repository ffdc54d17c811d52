"""lorakit's command line is one table of commands built from options declared once (lorakit.cli.COMMANDS)."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from lorakit import cli
from lorakit import options as opt
from lorakit.errors import LorakitError

SRC = Path(cli.__file__).resolve().parent


def leaf_rows():
    return [row for row in cli.COMMANDS if row.config is not None]


def declarations():
    """{spelling: {(id of the field object, its default)}} over every command's options."""
    out: dict[str, set] = {}
    for row in leaf_rows():
        for fl in opt.flags(row.config):
            for spelling in fl.spellings:
                out.setdefault(spelling, set()).add((id(fl.field), repr(opt._default_of(fl.field))))
    return out


def test_every_flag_spelling_is_declared_by_exactly_one_field_with_one_default():
    twice = {spelling: decl for spelling, decl in declarations().items() if len(decl) != 1}
    assert twice == {}
    assert {"--model", "--out", "--rank", "--batch-size", "--base-dtype", "--device", "--nproc"} <= set(declarations())


def test_no_add_argument_outside_the_generator_and_no_private_argparse():
    calls, private = [], []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "add_argument":
                calls.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("_action_groups", "_actions", "_option_string_actions",
                                                                  "_mutually_exclusive_groups"):
                private.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert calls and all(c.startswith("options.py:") for c in calls), calls
    assert private == []


def test_every_subcommand_in_help_is_a_table_row(capsys):
    import argparse

    names = set()
    p = cli.parser()
    stack = [("", p)]
    while stack:  # the subcommands argparse built, read back through its public parse of "--help" of each
        prefix, parser = stack.pop()
        for group in parser._subparsers._group_actions if parser._subparsers else ():  # noqa: SLF001 (test only)
            if isinstance(group, argparse._SubParsersAction):
                for name, sub in group.choices.items():
                    full = f"{prefix} {name}".strip()
                    names.add(full)
                    stack.append((full, sub))
    assert names == {row.name for row in cli.COMMANDS}
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    assert all(row.name in listed for row in cli.COMMANDS if " " not in row.name)
    for row in cli.COMMANDS:
        with pytest.raises(SystemExit) as info:
            cli.main([*row.name.split(), "--help"])
        assert info.value.code == 0


def test_prompt_and_chat_are_exclusive_and_one_is_needed(capsys):
    for argv, needle in ((["generate", "--prompt", "hi", "--chat"], "not allowed with argument"),
                         (["generate"], "one of the arguments --prompt --chat is required")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("lorakit: error:") and needle in err and err.count("\n") == 1


def test_each_command_keeps_its_defaults():
    def parse(*argv):
        args = cli.parser().parse_args(list(argv))
        return opt.from_flags(args._row.config, args)

    train = parse("train").train
    assert (train.model, train.out, train.batch_size, train.lora.r, train.base_dtype) == ("builtin:minilm", "out", 32, 8, "auto")
    bench = parse("bench")
    assert (bench.model, bench.r, bench.alpha, bench.targets, bench.steps, bench.warmup, bench.base_dtype, bench.out) == \
        ("builtin:smollm2", 16, 32.0, "all-linear", 20, 2, "fp32", "bench")
    assert parse("eval", "--adapter", "a").batch_size == 64
    assert parse("norms").out == "norms" and parse("reproduce", "celora").lora.r == 8
    advice = parse("rank-advice", "--model", "m", "--data", "d", "--tol", "0.5")
    assert (advice.steps, advice.lr, advice.lora.targets, advice.out) == (100, 1e-4, "all-linear", "rank-advice")
    assert parse("train", "--nproc", "2").nproc == 2
    assert dataclasses.asdict(train) == dataclasses.asdict(__import__("lorakit").train.TrainConfig())


def test_every_numeric_option_is_checked():
    """An option parsed with bare int or float (which take -1, nan) is refused by its configuration."""
    for row in leaf_rows():
        for fl in opt.flags(row.config):
            parse = fl.field.metadata.get("parse") or opt._scalar(fl.annotation)
            if parse not in (int, float):
                continue
            for bad in ((-1,) if parse is int else (-1.0, math.nan)):
                values: dict = {}
                *outer, name = fl.path.split(".")
                inner = values
                for part in outer:
                    inner = inner.setdefault(part, {})
                inner[name] = bad
                with pytest.raises((LorakitError, ValueError)):
                    cfg = opt.build(row.config, {"model": "m", **values} if row.name == "rank-advice" else values)
                    getattr(cfg, "validate", lambda: None)()
