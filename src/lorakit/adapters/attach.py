"""Attach adapters to a model in place; name, switch, delete and combine them; merge, unmerge, unload; summarise.

After ``attach`` only the active adapters, the modules_to_save and the biases chosen by
``LoraConfig.bias`` require grad; everything else is frozen.

Several named adapters, PEFT's way (``add_adapter`` / ``set_adapter`` / ``delete_adapter``):

    attach(model, cfg_a)                      # adapter "default", active
    attach(model, cfg_b, name="b")            # a second adapter, added inactive and frozen
    set_adapter(model, "b")                   # only "b" acts and trains
    set_adapter(model, ["default", "b"])      # both act: y = W0 x + s_a B_a A_a x + s_b B_b A_b x
    model(**batch, adapter_names=["b", "__base__", ...])   # one adapter per row, this call only
    add_weighted_adapter(model, ["default", "b"], [0.7, 0.3], "mix", combination_type="svd")
    delete_adapter(model, "b")
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from lorakit.adapters import variants
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.layer import BASE, LoraLinear
from lorakit.module_kinds import linear_shape
from lorakit.adapters.targets import Resolution, _under, resolve
from lorakit.errors import ConfigError, LorakitError
from lorakit.speed.allocator import return_freed_memory_to_the_system, reuse_freed_blocks
from lorakit.speed.forward import make_fast, remove_fast
from lorakit.speed.widen import widen_where_bf16_is_slow

_STATE_ATTR = "_lorakit_state"
DEFAULT = "default"


@dataclass
class AdapterEntry:
    """What attach did for one named adapter."""

    config: LoraConfig
    targets: list[str]
    modules_to_save: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class AdapterState:
    """The model's named adapters and which are active, kept on the model so save/merge/unload know them.

    ``config``, ``targets``, ``modules_to_save`` and ``notes`` are those of the one active adapter.
    """

    adapters: dict[str, AdapterEntry]
    active: list[str]
    hooks: list = field(default_factory=list)

    @property
    def active_name(self) -> str:
        if len(self.active) != 1:
            raise LorakitError(f"{len(self.active)} adapters are active ({self.active}); this needs one: "
                               "call lorakit.set_adapter(model, name) first, or name the adapter")
        return self.active[0]

    def entry(self, name: str | None = None) -> AdapterEntry:
        name = self.active_name if name is None else name
        if name not in self.adapters:
            raise LorakitError(f"the model has no adapter named {name!r}; it has {sorted(self.adapters)}")
        return self.adapters[name]

    config = property(lambda self: self.entry().config)
    targets = property(lambda self: self.entry().targets)
    modules_to_save = property(lambda self: self.entry().modules_to_save)
    notes = property(lambda self: self.entry().notes)


def state(model: nn.Module) -> AdapterState:
    st = getattr(model, _STATE_ATTR, None)
    if st is None:
        raise LorakitError(f"{type(model).__name__} has no lorakit adapter; call lorakit.attach(model, config) first")
    return st


def is_attached(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def lora_layers(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, LoraLinear]]:
    """The adapted layers, or those that hold adapter ``adapter``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and (adapter is None or adapter in module.settings):
            yield name, module


def check_ranks(model: nn.Module, cfg: LoraConfig, targets: list[str]) -> None:
    """Refuse r > min(in, out) before anything is modified, naming the module."""
    for name in targets:
        module = model.get_submodule(name)
        in_f, out_f = (module.in_features, module.out_features) if isinstance(module, LoraLinear) else linear_shape(module)
        r = cfg.rank_for(name)
        if r > min(in_f, out_f):
            raise ConfigError(
                f"rank r={r} for {name} exceeds min(in, out) = {min(in_f, out_f)} (the layer is {in_f} -> {out_f}); "
                "lower r or set a smaller rank for it with rank_pattern"
            )


def check_adapter_name(name: object) -> None:
    """An adapter name is a plain identifier (letters, digits, '_' and '-'): it becomes a folder name in saved files
    (PEFT's layout), so a path ("/abs/dir", "sub/dir", "..") would write outside the save directory."""
    if not isinstance(name, str) or not re.fullmatch(r"\w[\w-]*", name) or name == BASE:
        raise ConfigError(f"adapter name {name!r} must be a plain name of letters, digits, '_' and '-' (e.g. "
                          f"'my_task'), not a path and not {BASE!r}")
    if hasattr(nn.Module, name):
        raise ConfigError(f"adapter name {name!r} is the name of a torch.nn.Module attribute; choose another name")


def attach(model: nn.Module, config: LoraConfig | None = None, *, name: str = DEFAULT, fast: bool = True,
           resolution: Resolution | None = None, **overrides) -> nn.Module:
    """Wrap the target layers of ``model`` with LoRA adapters, in place, and return ``model``.

    ``config`` defaults to ``LoraConfig()``; keyword overrides are applied on top
    (``attach(model, r=4, targets="attn-qkv")``). Resolution notes (e.g. an architecture
    guessed from module names) are issued as warnings and kept in ``summary(model)``.
    On a model that has adapters already, ``name`` adds another one (PEFT's ``add_adapter``):
    it is inactive and frozen until ``set_adapter(model, name)``.

    ``fast`` (default True): the model's own forward becomes the fast one in training calls, for any
    caller (``lorakit.speed.forward``: the fused head and loss for decoders, with ``logits`` None in
    those calls; the one-row last layer for encoder classifiers; lorakit_sdpa attention on CPU), and
    PyTorch's CPU allocator keeps freed blocks for reuse (``speed.allocator.reuse_freed_blocks``).
    Evaluation, no-grad and generation calls run the model's forward unchanged. ``fast=False`` keeps
    the model's forward as it is.
    """
    cfg = (config or LoraConfig()).replace(**overrides) if overrides else (config or LoraConfig())
    check_adapter_name(name)
    return_freed_memory_to_the_system()  # a training step's freed temporaries must not stay resident (speed.allocator)
    first = not is_attached(model)
    if not first:
        _check_can_add(model, cfg, name)
    res = resolution or resolve(model, cfg)
    variant = variants.of(cfg)
    cfg = variant.plan(model, cfg, res.targets)  # checked before anything is modified; may set ranks (rank_pattern)
    check_ranks(model, cfg, res.targets)
    for note in res.notes:
        warnings.warn(note, stacklevel=2)
    if cfg.modules_to_save is None and res.modules_to_save:
        cfg = cfg.replace(modules_to_save=list(res.modules_to_save))
    if not first and res.modules_to_save:
        raise ConfigError(
            f"adapter {name!r} would train {res.modules_to_save} in full (modules_to_save), but the model holds other "
            "adapters and lorakit keeps one copy of such modules, trained in place; pass modules_to_save=[] for it, "
            "or use a separate model")
    if cfg.task_type is None:
        cfg = cfg.replace(task_type=_infer_task_type(model))

    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    for target in res.targets:
        parent_name, _, child = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        kw = dict(dropout=cfg.dropout, rslora=cfg.rslora, variant=variant)
        if isinstance(base, LoraLinear):
            base.add_adapter(name, cfg.rank_for(target), cfg.alpha_for(target), **kw)
            layer = base
        else:
            layer = LoraLinear(base, cfg.rank_for(target), cfg.alpha_for(target), name=target, adapter=name, **kw)
            setattr(parent, child, layer)
        if not first:
            layer.set_active(state(model).active)  # an added adapter stays inactive and frozen
    entry = AdapterEntry(cfg, list(res.targets), list(res.modules_to_save), list(res.notes))
    if first:
        _set_trainable(model, cfg, res.modules_to_save)
        setattr(model, _STATE_ATTR, AdapterState({name: entry}, [name]))
        _install_row_adapters(model)
    else:
        state(model).adapters[name] = entry
    variant.install(model)
    if first and fast:
        make_fast(model)
        reuse_freed_blocks()  # a training step's temporaries reuse the blocks the last layer freed (speed.allocator)
        widen_where_bf16_is_slow(model)  # a base loaded in bf16 on a CPU whose bf16 products are slow: fp32 products
    return model


def _check_can_add(model: nn.Module, cfg: LoraConfig, name: str) -> None:
    """A second adapter shares the base weights: refuse what would change them or share trained state."""
    st = state(model)
    if name in st.adapters:
        raise LorakitError(f"this model already has an adapter named {name!r}; attach another name, or "
                           f"lorakit.delete_adapter(model, {name!r}) first")
    if any(layer.merged for _, layer in lora_layers(model)):
        raise LorakitError("the model's adapters are merged into its weights; lorakit.unmerge(model) before adding one")
    for other, c in [(name, cfg)] + [(n, e.config) for n, e in st.adapters.items()]:
        shared = st.adapters[other].modules_to_save if other in st.adapters else []
        what = variants.of(c).one_per_model or (
            f"bias={c.bias!r} (the base biases would be shared by both adapters)" if c.bias != "none" else
            f"modules_to_save={shared} (trained in place, they would be shared by both adapters)" if shared else None)
        if what:
            raise ConfigError(f"adapter {other!r} has {what}, which lorakit supports with one adapter per model only; "
                              "use a separate model for it")


def set_adapter(model: nn.Module, adapters: str | Sequence[str]) -> nn.Module:
    """Make ``adapters`` (a name or a list of names) the active ones: they act in the forward and only they
    train (requires_grad), as PEFT's set_adapter. One active adapter runs the fused kernel."""
    st = state(model)
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    unknown = [n for n in names if n not in st.adapters]
    if unknown or not names:
        raise LorakitError(f"set_adapter({adapters!r}): the model has adapters {sorted(st.adapters)}; name one or more of them")
    alone = _acts_alone(st, names)
    if len(names) > 1 and alone:
        raise ConfigError(f"set_adapter({names!r}): {alone} is active alone in lorakit; activate it by itself")
    if any(layer.merged for _, layer in lora_layers(model)):
        raise LorakitError("the active adapters are merged into the weights; lorakit.unmerge(model) before switching")
    for _, layer in lora_layers(model):
        layer.set_active(names)
    st.active = list(dict.fromkeys(names))
    return model


def _acts_alone(st: AdapterState, names) -> str | None:
    """The description of the first of adapters ``names`` whose variant must act alone, or None."""
    return next(filter(None, (variants.of(st.adapters[n].config).active_alone for n in names)), None)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer (layers left without an adapter get their base layer back).
    If it was active, the remaining adapters' first becomes active. The last adapter is removed by ``unload``."""
    st = state(model)
    if name not in st.adapters:
        raise LorakitError(f"delete_adapter: the model has no adapter named {name!r}; it has {sorted(st.adapters)}")
    if len(st.adapters) == 1:
        raise LorakitError(f"{name!r} is the model's only adapter; remove it with lorakit.unload(model, merge=False)")
    for path, layer in list(lora_layers(model, name)):
        layer.delete_adapter(name)
        if not layer.settings:
            _replace(model, path, layer.base_layer)
    del st.adapters[name]
    remaining = [a for a in st.active if a != name] or [next(iter(st.adapters))]
    set_adapter(model, remaining)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were attached."""
    return list(state(model).adapters)


def active_adapters(model: nn.Module) -> list[str]:
    return list(state(model).active)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---------------------------------------------------------------------- mixed batches
def _install_row_adapters(model: nn.Module) -> None:
    """``model(..., adapter_names=[...])``: the keyword is taken off the call before the model's own forward
    sees it and given to every adapted layer for that call (PEFT's mixed-batch inference)."""
    state(model).hooks = [model.register_forward_pre_hook(_take_row_adapters, with_kwargs=True),
                          model.register_forward_hook(_clear_row_adapters, always_call=True)]


def _take_row_adapters(model: nn.Module, args, kwargs):
    rows = kwargs.pop("adapter_names", None)
    if rows is None:
        return None
    if isinstance(rows, str):  # list("b") would be one adapter per letter
        raise ConfigError(f"adapter_names={rows!r} must be a list with one adapter name (or {BASE!r}) per row of the "
                          "batch")
    st, rows = state(model), list(rows)
    unknown = sorted({r for r in rows if r != BASE and r not in st.adapters})
    if unknown:
        raise LorakitError(f"adapter_names holds {unknown}, which the model does not have; its adapters are "
                           f"{sorted(st.adapters)} (and {BASE!r} for the base model)")
    alone = _acts_alone(st, dict.fromkeys(r for r in rows if r != BASE))
    if alone:
        raise ConfigError(f"adapter_names with {alone} is not supported (PEFT refuses it too); "
                          "run its rows in a batch of their own with set_adapter")
    if any(layer.merged for _, layer in lora_layers(model)):
        raise LorakitError("adapter_names cannot be used while adapters are merged; lorakit.unmerge(model) first")
    for _, layer in lora_layers(model):
        layer.row_adapters = rows
    return args, kwargs


def _clear_row_adapters(model: nn.Module, args, output) -> None:
    for _, layer in lora_layers(model):
        layer.row_adapters = None


def _infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if cls.endswith(suffix):
            return task
    return None


def is_adapter_parameter(name: str) -> bool:
    """True for a LoRA factor or a per-feature magnitude (``...q_proj.lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name


def _set_trainable(model: nn.Module, cfg: LoraConfig, modules_to_save: list[str]) -> None:
    for name, param in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if is_adapter_parameter(name):
            param.requires_grad_(True)
        elif modules_to_save and _under(module_name, modules_to_save):
            param.requires_grad_(True)
        elif name.endswith("bias") and cfg.bias == "all":
            param.requires_grad_(True)
        elif name.endswith("base_layer.bias") and cfg.bias == "lora_only":
            param.requires_grad_(True)


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (W0 <- W0 + s B A); forward no longer pays for them."""
    state(model)
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` (W0 <- W0 - s B A)."""
    state(model)
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapters and return the plain model, with the active ones merged (default) or all discarded.

    With ``merge=False`` the base weights get back the values they had before the adapters' init (a variant such as
    PiSSA rewrites them to a residual).
    """
    st = state(model)
    for entry in st.adapters.values():
        variants.of(entry.config).uninstall(model)
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
            for adapter, settings in layer.settings.items():
                settings.variant.restore_base(layer, adapter)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    for hook in st.hooks:
        hook.remove()
    remove_fast(model)
    delattr(model, _STATE_ATTR)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (adapters bypassed, not removed)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.enabled = was


@dataclass
class Summary:
    """Trainable and total parameter counts, per adapted module."""

    rows: list[tuple[str, str, int, int, int, float, int]]  # name, kind, in, out, r, scale, params
    trainable: int
    total: int
    modules_to_save: list[str]
    notes: list[str]

    @property
    def adapter_params(self) -> int:
        return sum(r[-1] for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'module':<56} {'kind':<6} {'in':>6} {'out':>6} {'r':>4} {'scale':>7} {'params':>10}"]
        for name, kind, in_f, out_f, r, scale, n in self.rows:
            lines.append(f"{name:<56} {kind:<6} {in_f:>6} {out_f:>6} {r:>4} {scale:>7.3g} {n:>10,}")
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(
            f"{len(self.rows)} adapted modules, {self.adapter_params:,} adapter parameters; "
            f"trainable {self.trainable:,} of {self.total:,} ({pct:.3f}%)"
        )
        if self.modules_to_save:
            lines.append(f"trained in full: {', '.join(self.modules_to_save)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Per-target table plus trainable / total parameter counts (frozen base included in total)."""
    st = state(model)
    rows = []
    several = len(st.adapters) > 1
    for name, layer in lora_layers(model):
        kind = "Conv1D" if layer.fan_in_fan_out else "Linear"
        for adapter, s in layer.settings.items():
            n = sum(p.numel() for p in layer.adapter_parameters(adapter))
            label = f"{name} [{adapter}{', active' if adapter in layer.active_adapters else ''}]" if several else name
            rows.append((label, kind, layer.in_features, layer.out_features, s.r, s.scale, n))
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    entries = list(st.adapters.values())
    return Summary(rows, trainable, total, sorted({m for e in entries for m in e.modules_to_save}),
                   list(dict.fromkeys(n for e in entries for n in e.notes)))
