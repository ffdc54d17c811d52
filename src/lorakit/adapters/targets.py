"""Which modules of a model an adapter goes on.

Targets are a preset, a regex (full match against the module path, as PEFT does for a
string), or a list of module paths / dotted suffixes. Presets resolve by architecture:

    attn-qv     query and value projections ("partial adaptation" in Hu et al. 2025)
    attn-qkv    query, key and value projections ("full adaptation")
    all-linear  every nn.Linear / Conv1D except the output head and modules_to_save

Architectures that fuse q, k and v into one matrix (GPT-2 c_attn, GPT-NeoX
query_key_value, Phi-3 qkv_proj) get that matrix for both attention presets: one adapter
then covers all three projections, which the resolution notes say.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from lorakit.adapters.config import PRESETS, LoraConfig
from lorakit.architectures import GUESSED_PROJECTIONS, HEAD_NAMES, fused_projection, model_type_of, separate_projections
from lorakit.adapters.layer import LoraLinear
from lorakit.module_kinds import is_adaptable
from lorakit.errors import TargetError, closest

@dataclass
class Resolution:
    """The outcome of target resolution: module paths to adapt, trained heads, and notes."""

    targets: list[str]
    modules_to_save: list[str]
    notes: list[str] = field(default_factory=list)


def model_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` as the user's model has them: an adapted layer is one module (its
    base_layer and factors hidden), so a second adapter resolves its targets as the first did."""
    out, inside = [], None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        out.append((name, module))
        inside = f"{name}." if isinstance(module, LoraLinear) else None
    return out


def linear_modules(model: nn.Module) -> list[str]:
    """Paths of the layers an adapter can go on (nn.Linear, Conv1D, or one adapted already)."""
    return [n for n, m in model_modules(model) if n and (is_adaptable(m) or isinstance(m, LoraLinear))]


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def matches(name: str, entries: Iterable[str]) -> bool:
    """PEFT's list semantics: an entry matches a module path exactly or as a dotted suffix."""
    return any(name == e or name.endswith("." + e) for e in entries)


def _under(name: str, roots: Iterable[str]) -> bool:
    """True if ``name`` is one of ``roots`` or inside one (PEFT's modules_to_save exclusion)."""
    return any(re.match(rf"(^|.*\.){re.escape(r)}($|\..*)", name) for r in roots)


def output_heads(model: nn.Module) -> set[str]:
    """Paths of output heads never adapted by 'all-linear': the output embedding and task heads."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model_modules(model):
        if (out is not None and module is out) or leaf(name) in HEAD_NAMES:
            heads.add(name)
    return heads


def default_modules_to_save(model: nn.Module) -> list[str]:
    """Task heads that start untrained and must train in full (PEFT adds the same for SEQ_CLS)."""
    cls = type(model).__name__
    wanted: tuple[str, ...] = ()
    if cls.endswith(("ForSequenceClassification", "ForTokenClassification")):
        wanted = ("classifier", "score")
    elif cls.endswith("ForQuestionAnswering"):
        wanted = ("qa_outputs",)
    names = {n for n, _ in model_modules(model)}
    return [w for w in wanted if w in names]


def _attention_leaves(model: nn.Module, which: str, notes: list[str]) -> set[str]:
    model_type = model_type_of(model)
    fused = fused_projection(model_type)
    if fused is not None:
        notes.append(f"{model_type} fuses q, k and v into '{fused}': one adapter on it covers all three projections")
        return {fused}
    separate = separate_projections(model_type)
    if separate is not None:
        q, k, v = separate
        return {q, v} if which == "attn-qv" else {q, k, v}
    leaves = {leaf(n) for n in linear_modules(model)}
    guess = GUESSED_PROJECTIONS
    found = leaves & (guess["q"] | guess["v"] | (set() if which == "attn-qv" else guess["k"]))
    if not found:
        found = leaves & guess["fused"]
    notes.append(
        f"architecture {model_type!r} has no preset; guessed the {which} projections from module names: {sorted(found)}. "
        "Pass targets=[...] explicitly if this is wrong"
    )
    return found


def numbered_blocks(names: Iterable[str]) -> dict[str, set[int]]:
    """{block list name: its indices} of the numbered module lists of a model ("layer": {0, 1} for BERT's
    bert.encoder.layer.N, "h" for GPT-2's transformer.h.N)."""
    out: dict[str, set[int]] = {}
    for name in names:
        parts = name.split(".")
        for before, part in zip(parts, parts[1:]):
            if part.isdigit():
                out.setdefault(before, set()).add(int(part))
    return out


def _ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (as --layers takes it)."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_layers(model: nn.Module, cfg: LoraConfig, names: list[str]) -> None:
    """layers_to_transform (--layers) and layers_pattern (--layers-pattern) must name blocks the model has: a pattern
    that matches no numbered block list, or layer indices beyond the model's depth, would quietly adapt fewer layers
    than asked (or none)."""
    if cfg.layers_to_transform is None:
        return
    wanted = cfg.layers_to_transform if isinstance(cfg.layers_to_transform, list) else [cfg.layers_to_transform]
    kind = type(model).__name__
    present = {i for i in map(cfg.layer_index, names) if i is not None}
    if not present:
        blocks = numbered_blocks(names)
        listed = ", ".join(f"{b!r} ({len(i)} blocks)" for b, i in sorted(blocks.items()))
        if cfg.layers_pattern is not None:
            raise TargetError(f"layers_pattern={cfg.layers_pattern!r} (--layers-pattern) matches no numbered block list "
                              f"of {kind}; its numbered block lists are named: {listed or 'none'}")
        raise TargetError(f"layers_to_transform={wanted} (--layers): {kind} has no numbered blocks of layers; drop --layers")
    missing = sorted(set(wanted) - present)
    if missing:
        raise TargetError(f"layers_to_transform (--layers) {_ranges(wanted)} goes beyond the {max(present) + 1} layers of "
                          f"{kind} (blocks {_ranges(present)}): layer(s) {_ranges(missing)} do not exist; choose --layers "
                          f"within {_ranges(present)}")


def resolve(model: nn.Module, cfg: LoraConfig, *, strict_entries: bool = True) -> Resolution:
    """Resolve ``cfg.targets`` on ``model`` into module paths.

    strict_entries: every entry of a list must match at least one module (a typo is an error).
    Loading a PEFT file relaxes this, as PEFT does, to "at least one entry matches".
    """
    notes: list[str] = []
    all_names = [n for n, _ in model_modules(model) if n]
    adaptable = linear_modules(model)
    if strict_entries:  # a PEFT file is read as PEFT reads it: layers it names that the model lacks are skipped
        check_layers(model, cfg, all_names)
    modules_to_save = default_modules_to_save(model) if cfg.modules_to_save is None else list(cfg.modules_to_save)
    for m in modules_to_save:
        if m not in all_names and not any(n.endswith("." + m) for n in all_names):
            raise TargetError(f"modules_to_save entry {m!r} matches no module; closest: {closest(m, all_names)}")

    targets = cfg.targets
    if isinstance(targets, str) and targets in PRESETS:
        if targets == "all-linear":
            heads = output_heads(model)
            chosen = [n for n in adaptable if n not in heads]
        else:
            leaves = _attention_leaves(model, targets, notes)
            chosen = [n for n in adaptable if leaf(n) in leaves]
        chosen = [n for n in chosen if cfg.selects_layer(n)]
    elif isinstance(targets, str):
        hits = [n for n in all_names if re.fullmatch(targets, n)]
        bad = [n for n in hits if n not in adaptable]
        if bad:
            kinds = {type(model.get_submodule(n)).__name__ for n in bad}
            raise TargetError(
                f"targets regex {targets!r} matches modules that are not linear layers ({sorted(kinds)}): "
                f"{bad[:5]}; lorakit adapts nn.Linear and Conv1D only"
            )
        chosen = hits
    else:
        chosen = []
        unmatched = []
        for entry in targets:
            hits = [n for n in all_names if n == entry or (n.endswith("." + entry) and cfg.selects_layer(n))]
            if not hits and cfg.layers_to_transform is not None and any(n.endswith("." + entry) for n in all_names):
                continue  # the entry names modules, just none in the chosen layers
            if not hits:
                unmatched.append(entry)
                continue
            bad = [n for n in hits if n not in adaptable]
            if bad:
                kind = type(model.get_submodule(bad[0])).__name__
                raise TargetError(f"target {entry!r} matches {bad[0]!r}, a {kind}; lorakit adapts nn.Linear and Conv1D only")
            chosen.extend(h for h in hits if h not in chosen)
        if unmatched and (strict_entries or not chosen):
            leaves = sorted({leaf(n) for n in adaptable})
            raise TargetError(
                "target " + ", ".join(repr(u) for u in unmatched) + " matches no module of "
                f"{type(model).__name__}; closest linear layers: {closest(unmatched[0], leaves + adaptable)}"
            )

    if cfg.exclude:
        before = len(chosen)
        if isinstance(cfg.exclude, str):
            chosen = [n for n in chosen if not re.fullmatch(cfg.exclude, n)]
        else:
            chosen = [n for n in chosen if not matches(n, cfg.exclude)]
        if len(chosen) == before:
            how = "a regex is matched against the whole module path" if isinstance(cfg.exclude, str) else \
                "names match a whole path or a dotted suffix"
            notes.append(f"exclude={cfg.exclude!r} excludes none of the targets ({how})")
    chosen = [n for n in chosen if not _under(n, modules_to_save)]
    if not chosen:
        leaves = sorted({leaf(n) for n in adaptable})
        layers = f", layers_to_transform={cfg.layers_to_transform!r}" if cfg.layers_to_transform is not None else ""
        raise TargetError(
            f"targets={cfg.targets!r}{layers} selects no linear layer of {type(model).__name__} "
            f"(after exclude and modules_to_save); its linear layers are named: {leaves[:20]}"
        )
    return Resolution(targets=chosen, modules_to_save=modules_to_save, notes=notes)


def compact_target_list(targets: list[str], model: nn.Module, cfg: LoraConfig | None = None) -> list[str]:
    """The shortest PEFT target_modules list that selects exactly ``targets`` on ``model``.

    Leaf names when they (with ``cfg``'s layers_to_transform, if any) pick out exactly the same
    modules (the common case, e.g. ["query", "value"]), otherwise the full module paths, which
    PEFT matches whatever the layer.
    """
    adaptable = linear_modules(model)
    leaves = sorted({leaf(t) for t in targets})
    in_layers = cfg.selects_layer if cfg is not None else (lambda name: True)
    if sorted(n for n in adaptable if leaf(n) in leaves and in_layers(n)) == sorted(targets):
        return leaves
    return sorted(targets)
