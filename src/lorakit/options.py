"""Ground floor: each option declared once, as a dataclass field that carries its help text.

A configuration dataclass (``TrainConfig``, ``LoraConfig`` and its nested groups) declares a
field with ``option(default, "help", ...)``; ``add_flags(parser, TrainConfig)`` turns the fields
into argparse flags (a nested dataclass field becomes an argument group, its fields flat
flags), and ``from_flags(TrainConfig, namespace)`` builds the configuration from the flags the
user gave, so every default lives in the dataclass alone. A new option is one field.

    rank: int = option(8, "adapter rank r", flag="--rank")
    -> lorakit train --rank 16    (help: "adapter rank r (default: 8)")

The parsers below turn a command-line string into a field's value ("a,b" -> a list, "0-3" ->
layer indices, a rank-advice JSON file -> a rank pattern); they raise ``ArgumentTypeError``,
which argparse reports as one ``lorakit: error:`` line naming the flag. The number parsers
(``positive_int``, ``seed_int``, ``finite_float(lo, hi)``, ``positive_float``) are the one check of
every numeric option that states its range on the command line:

    batch_size: int | None = option(None, "rows per batch", parse=positive_int)
    -> lorakit eval --batch-size -1
       lorakit: error: argument --batch-size: -1 is not a positive integer; give 1 or more
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, factory: Callable[[], Any] | None = None, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, choices: tuple[str, ...] | None = None, metavar: str | None = None,
           aliases: tuple[str, ...] = (), default_text: str | None = None, section: str | None = None,
           cli: bool = True, positional: bool = False, exclusive: str | None = None, required: bool = False,
           action: str | None = None) -> Any:
    """A dataclass field with its command-line form.

    flag: the spelling (default ``--`` + the name with dashes); aliases: older spellings, accepted and
    hidden from --help; parse: string -> value (default: from the annotation, int/float/str);
    default_text: how --help states the default when the value alone would not say it ("the task's");
    section: the argument group --help lists it under; cli=False: not a command-line option (set by lorakit itself);
    positional: an argument without a flag (``lorakit export RUN``), required when the field has no default;
    exclusive: the name of a set of options of which at most one may be given (``--prompt`` or ``--chat``), exactly
    one when a member says required=True; action="version": prints the default (a version string) and exits.
    """
    metadata = {"help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar, "aliases": aliases,
                "default_text": default_text, "section": section, "cli": cli, "positional": positional,
                "exclusive": exclusive, "required": required, "action": action}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def group(cls: type, title: str | None = None, *, factory: Callable[[], Any] | None = None,
          only: tuple[str, ...] | None = None, aliases: dict[str, tuple[str, ...]] | None = None) -> Any:
    """A nested configuration (a dataclass of options), shown as one argument group titled ``title`` (None: each
    field under its own section).

    factory: the group's default (a preset, e.g. bench's ``LoraConfig(r=16, alpha=32)``; --help states its values);
    only: the fields of ``cls`` this command takes (the others keep the preset's values); aliases: more hidden
    spellings of the group's fields for this command ({"r": ("--r",)}). The options stay declared once, in ``cls``."""
    return dataclasses.field(default_factory=factory or cls,
                             metadata={"group": title, "cls": cls, "only": only, "aliases": aliases or {}})


def fill_defaults(config: Any) -> None:
    """Set each field of ``config`` that is None to the value its class's ``DEFAULTS`` gives it.

    A shared option (``--model``, ``--out``, ``--batch-size``) is declared once with the default None ("the
    command's"); each command's configuration says in ``DEFAULTS`` what None means for it (TrainConfig:
    {"model": "builtin:minilm", "out": "out"}), and --help shows that value."""
    for name, value in getattr(type(config), "DEFAULTS", {}).items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line option: the dotted path of its field (``lora.celora.keep_ratio``) and how it parses.

    default: the value this command starts from (the field's, its class's ``DEFAULTS`` entry or its group's preset);
    default_text: how --help states it (the class's ``DEFAULT_TEXTS`` entry, else the field's)."""

    path: str
    field: dataclasses.Field
    annotation: Any
    group: str | None
    default: Any = None
    default_text: str | None = None
    aliases: tuple[str, ...] = ()
    note: str | None = None
    required: bool = False
    exclusive: str | None = None

    @property
    def spelling(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.field.name.replace("_", "-")

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every spelling of the option (a positional argument has none)."""
        if self.field.metadata.get("positional"):
            return ()
        return (self.spelling, *(self.field.metadata.get("aliases") or ()), *self.aliases)

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")


def flags(cls: type, *, prefix: str = "", title: str | None = None, only: tuple[str, ...] | None = None,
          preset: Any = None, aliases: dict[str, tuple[str, ...]] | None = None) -> Iterator[Flag]:
    """Every command-line option of ``cls`` and its nested groups, in declaration order (less the names in the
    class's ``OMIT``: options of a shared group that this command does not take). A class's REQUIRED names the
    options this command needs, its ONE_OF the sets of options of which it needs exactly one."""
    hints = typing.get_type_hints(cls)
    omit = set(getattr(cls, "OMIT", ()))
    defaults, texts, notes = (getattr(cls, name, {}) for name in ("DEFAULTS", "DEFAULT_TEXTS", "NOTES"))
    required = set(getattr(cls, "REQUIRED", ()))
    one_of = {name: "+".join(names) for names in getattr(cls, "ONE_OF", ()) for name in names}
    for f in dataclasses.fields(cls):
        if f.name in omit or (only is not None and f.name not in only):
            continue
        m = f.metadata
        if "group" in m:
            inner = f.default_factory() if f.default_factory is not _MISSING else None
            yield from flags(m["cls"], prefix=f"{prefix}{f.name}.", title=m["group"] or title, only=m.get("only"),
                             preset=inner, aliases=m.get("aliases"))
        elif m.get("cli", True) and "help" in m:
            default = getattr(preset, f.name) if preset is not None else defaults.get(f.name, _default_of(f))
            text = texts.get(f.name, m.get("default_text"))
            if f.name in defaults and f.name not in texts and str(text).split(" ")[0] != str(defaults[f.name]):
                text = None  # the shared text describes another default: the command's value says it
            yield Flag(prefix + f.name, f, hints[f.name], title or m.get("section"), default, text,
                       tuple((aliases or {}).get(f.name, ())), notes.get(f.name),
                       bool(m.get("required")) or f.name in required or f.name in one_of,
                       one_of.get(f.name) or m.get("exclusive"))


def fields_without_help(cls: type, *, prefix: str = "") -> list[str]:
    """Fields declared without ``option`` (no help text, no flag): what a test of "every option" looks for."""
    out = []
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            out += fields_without_help(f.metadata["cls"], prefix=f"{prefix}{f.name}.")
        elif "help" not in f.metadata:
            out.append(prefix + f.name)
    return out


def _scalar(annotation: Any) -> type | None:
    """int, float or str when the annotation is one of them (or it | None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in (int, float, str) else None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not _MISSING else None


def _help_text(fl: Flag) -> str:
    default, shown = fl.default, fl.default_text
    empty = default is None or isinstance(default, bool) or (isinstance(default, (str, list, dict, tuple)) and not default)
    if shown is None and not empty:
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    text = f"{fl.help}: {fl.note}" if fl.note else fl.help
    text = f"{text} (default: {shown})" if shown and not fl.required else text  # a required option has none
    return text.replace("%", "%%")  # argparse formats help with %


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """argparse options for every field of ``cls`` (sections and nested groups as argument groups, ``exclusive``
    sets as mutually exclusive groups); flags not given stay unset. The one place lorakit calls ``add_argument``."""
    groups: dict[str | None, Any] = {None: parser}
    exclusive: dict[str, Any] = {}
    listed = list(flags(cls))
    required_sets = {fl.exclusive for fl in listed if fl.required and fl.exclusive}
    for fl in listed:
        if fl.group not in groups:
            groups[fl.group] = parser.add_argument_group(fl.group)
        target = groups[fl.group]
        m, default = fl.field.metadata, fl.default
        if fl.exclusive:
            if fl.exclusive not in exclusive:
                exclusive[fl.exclusive] = target.add_mutually_exclusive_group(required=fl.exclusive in required_sets)
            target = exclusive[fl.exclusive]
        if m.get("action") == "version":
            target.add_argument(fl.spelling, action="version", version=default, help=fl.help)
            continue
        kw: dict[str, Any] = {"dest": fl.path, "default": argparse.SUPPRESS, "help": _help_text(fl)}
        if fl.annotation is bool or (default is None and typing.get_args(fl.annotation) == (bool, type(None))):
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        else:
            parse = m.get("parse") or _scalar(fl.annotation)
            if parse is None:
                raise TypeError(f"option {fl.path}: give parse= for the annotation {fl.annotation!r}")
            kw["type"] = parse
            if m.get("choices"):
                kw["choices"] = m["choices"]
            else:
                kw["metavar"] = m.get("metavar") or fl.field.name.upper()
        if m.get("positional"):
            del kw["dest"]
            if fl.field.default is _MISSING and fl.field.default_factory is _MISSING:
                del kw["default"]
            else:
                kw["nargs"] = "?"
            target.add_argument(fl.path, **kw)
            continue
        if fl.required and not fl.exclusive:
            kw["required"] = True
            del kw["default"]
        target.add_argument(fl.spelling, **kw)
        for alias in (*(m.get("aliases") or ()), *fl.aliases):
            target.add_argument(alias, **{**kw, "help": argparse.SUPPRESS})


def given(namespace: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line, nested groups as dicts of theirs."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            inner = given(namespace, f.metadata["cls"], prefix=f"{prefix}{f.name}.")
            if inner:
                out[f.name] = inner
        elif hasattr(namespace, prefix + f.name):
            out[f.name] = getattr(namespace, prefix + f.name)
    return out


def build(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` with nested groups built from their dicts (over their defaults: the group's preset)."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if "group" in f.metadata and isinstance(value, dict):
            if f.default_factory is not f.metadata["cls"] and f.default_factory is not _MISSING:
                base = dataclasses.asdict(f.default_factory())
                value = build(f.metadata["cls"], {**{k: v for k, v in base.items() if k not in _groups(f.metadata["cls"])},
                                                  **value})
            else:
                value = build(f.metadata["cls"], value)
        kw[f.name] = value
    return cls(**kw)


def _groups(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if "group" in f.metadata}


def from_flags(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """The configuration the command line asks for: the dataclass defaults, the flags given, then ``overrides``.

    A validation error that names a field spelled otherwise on the command line (``r=0``) gets the flag in front
    (``--rank: r=0 must be ...``)."""
    try:
        return build(cls, {**given(namespace, cls), **overrides})
    except ConfigError as exc:
        named = re.match(r"(\w+)[=\[ ]", str(exc))
        for fl in flags(cls):
            if named and fl.field.name == named[1] and fl.spelling != "--" + named[1].replace("_", "-"):
                raise ConfigError(f"{fl.spelling}: {exc}") from None
        raise


def flatten(cls: type, doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}: a configuration's dict (``dataclasses.asdict``) as dotted paths."""
    nested = {f.name: f.metadata["cls"] for f in dataclasses.fields(cls) if "group" in f.metadata}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in nested and isinstance(value, dict):
            out.update(flatten(nested[key], value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def spelling(cls: type, path: str) -> str:
    """The command-line flag of the field at ``path`` (``lora.r`` -> ``--rank``), else the path itself."""
    for fl in flags(cls):
        if fl.path == path:
            return fl.spelling
    return path


# ---------------------------------------------------------------------- string -> value
def parse_names(value: str) -> str | list[str]:
    """"a,b,c" and a plain dotted name ("k_proj", "layers.0.mlp") become a list of names (matched as PEFT matches
    a list: the whole path or a dotted suffix); a preset ("attn-qv") or any other regex stays a string (matched
    in full against module paths)."""
    if "," in value or re.fullmatch(r"[\w.]+", value):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def parse_regexes(value: str) -> str | list[str]:
    """One regex, or several separated by commas (a list)."""
    return [v.strip() for v in value.split(",") if v.strip()] if "," in value else value


def parse_name_list(value: str) -> list[str]:
    """"a,b" -> ["a", "b"]; "" -> [] (none)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_keep_ratio(value: str) -> float | dict[str, float]:
    """0.6, or "v_proj=0.55,down_proj=0.65"."""
    try:
        if "=" not in value:
            return float(value)
        pairs = (item.split("=", 1) for item in value.split(",") if item.strip())
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor name=ratio pairs (v_proj=0.55,o_proj=0.55)") from None


def parse_svd_rank(value: str) -> int | str:
    if value == "balanced":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither an integer nor 'balanced'") from None


def parse_layers(value: str) -> list[int]:
    """"0-5", "0,2,4" or "0-3,8" -> the sorted layer indices."""
    out: set[int] = set()
    try:
        for part in (p.strip() for p in value.split(",")):
            first, dash, last = part.partition("-")
            lo, hi = int(first), int(last) if dash else int(first)
            if lo < 0 or hi < lo:
                raise ValueError
            out.update(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of layer indices; use e.g. 0-5 or 0,2,4 or 0-3,8") from None
    return sorted(out)


def _pattern(value: str, what: str, number: type) -> dict[str, Any]:
    """name=x,name=x, or a JSON file ({module: x}, or an object holding ``what``, as rank-advice's advice.json)."""
    if value.endswith(".json") or Path(value).is_file():
        try:
            doc = json.loads(Path(value).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise argparse.ArgumentTypeError(f"cannot read {value}: {type(exc).__name__}: {str(exc)[:100]}") from None
        doc = doc.get(what, doc) if isinstance(doc, dict) else doc
        ok = isinstance(doc, dict) and all(isinstance(v, (int, float) if number is float else int) and not isinstance(v, bool)
                                           for v in doc.values())
        if not ok:
            raise argparse.ArgumentTypeError(f"{value}: expected {{module: {what.split('_')[0]}}} or an object with a {what}")
        return doc
    out = {}
    for part in value.split(","):
        name, _, x = part.partition("=")
        try:
            out[name.strip()] = number(x)
        except ValueError:
            name = ""
        if not name.strip():
            x = "r" if number is int else "alpha"
            raise argparse.ArgumentTypeError(f"{value!r}: use name={x},name={x} or a JSON file")
    return out


def parse_rank_pattern(value: str) -> dict[str, int]:
    """Per-module ranks: "q_proj=4,v_proj=16", or rank-advice's advice.json (its rank_pattern) or {module: rank}."""
    return _pattern(value, "rank_pattern", int)


def parse_alpha_pattern(value: str) -> dict[str, float]:
    """Per-module alphas: "q_proj=8,v_proj=32", or a JSON file {module: alpha} (or an object with an alpha_pattern)."""
    return _pattern(value, "alpha_pattern", float)


# ---------------------------------------------------------------------- numbers
SEED_LIMIT = 2**63  # torch.manual_seed takes 0 to 2**63 - 1


def is_int(value: Any, at_least: int | None = None) -> bool:
    """An int (not a bool, not a float or string from a hand-edited file), at least ``at_least`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (at_least is None or value >= at_least)


def is_finite(value: Any) -> bool:
    """A finite int or float (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_seed(value: Any) -> bool:
    return is_int(value, 0) and value < SEED_LIMIT


def _int(value: str, what: str, fix: str) -> int:
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}; {fix}") from None


def positive_int(value: str) -> int:
    """"3" -> 3; "0", "-1", "x", "1.5" are refused."""
    n = _int(value, "a positive integer", "give 1 or more")
    if not is_int(n, 1):
        raise argparse.ArgumentTypeError(f"{n} is not a positive integer; give 1 or more")
    return n


def seed_int(value: str) -> int:
    """A random seed: an integer from 0 to 2**63 - 1 (as lorakit train's --seed)."""
    n = _int(value, "an integer seed", "give an integer from 0 to 2**63 - 1")
    if not is_seed(n):
        raise argparse.ArgumentTypeError(f"{n} is not a seed; give an integer from 0 to 2**63 - 1")
    return n


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> Callable[[str], float]:
    """A parser of finite numbers in [lo, hi] ((lo, ...] with lo_open, [..., hi) with hi_open; None: unbounded):
    finite_float(0, 1, lo_open=True)("1.5") is refused with "1.5 is not a number in (0, 1]"."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    if lo is not None and hi is not None:
        wanted = f"a number in {left}{lo:g}, {hi:g}{right}"
    elif lo is not None:
        wanted = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        wanted = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
        wanted = "a finite number"

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {wanted}") from None
        ok = is_finite(x)
        if ok and lo is not None:
            ok = x > lo if lo_open else x >= lo
        if ok and hi is not None:
            ok = x < hi if hi_open else x <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"{value} is not {wanted}")
        return x

    parse.__name__ = f"finite_float({lo}, {hi})"
    return parse


positive_float = finite_float(0, lo_open=True)  # a finite number > 0 (a learning rate, a tolerance)
positive_float.__name__ = "positive_float"
