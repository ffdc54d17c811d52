"""Attach adapters to a model in place; merge, unmerge, unload; summarise.

After ``attach`` only the adapters, the modules_to_save and the biases chosen by
``LoraConfig.bias`` require grad; everything else is frozen.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.layer import LoraLinear, linear_shape
from lorakit.adapters.targets import Resolution, _under, resolve
from lorakit.errors import ConfigError, LorakitError

_STATE_ATTR = "_lorakit_state"


@dataclass
class AdapterState:
    """What attach did, kept on the model so save/merge/unload know it."""

    config: LoraConfig
    targets: list[str]
    modules_to_save: list[str]
    notes: list[str] = field(default_factory=list)


def state(model: nn.Module) -> AdapterState:
    st = getattr(model, _STATE_ATTR, None)
    if st is None:
        raise LorakitError(f"{type(model).__name__} has no lorakit adapter; call lorakit.attach(model, config) first")
    return st


def is_attached(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def check_ranks(model: nn.Module, cfg: LoraConfig, targets: list[str]) -> None:
    """Refuse r > min(in, out) before anything is modified, naming the module."""
    for name in targets:
        in_f, out_f = linear_shape(model.get_submodule(name))
        r = cfg.rank_for(name)
        if r > min(in_f, out_f):
            raise ConfigError(
                f"rank r={r} for {name} exceeds min(in, out) = {min(in_f, out_f)} (the layer is {in_f} -> {out_f}); "
                "lower r or set a smaller rank for it with rank_pattern"
            )


def attach(model: nn.Module, config: LoraConfig | None = None, *, resolution: Resolution | None = None, **overrides) -> nn.Module:
    """Wrap the target layers of ``model`` with LoRA adapters, in place, and return ``model``.

    ``config`` defaults to ``LoraConfig()``; keyword overrides are applied on top
    (``attach(model, r=4, targets="attn-qkv")``). Resolution notes (e.g. an architecture
    guessed from module names) are issued as warnings and kept in ``summary(model)``.
    """
    cfg = (config or LoraConfig()).replace(**overrides) if overrides else (config or LoraConfig())
    if is_attached(model):
        raise LorakitError("this model already has a lorakit adapter; call lorakit.unload(model) before attaching another")
    res = resolution or resolve(model, cfg)
    celora_specs = None
    if cfg.backward == "celora":
        celora_specs, cfg = _plan_celora(model, cfg, res.targets)
    check_ranks(model, cfg, res.targets)
    for note in res.notes:
        warnings.warn(note, stacklevel=2)
    if cfg.modules_to_save is None and res.modules_to_save:
        cfg = cfg.replace(modules_to_save=list(res.modules_to_save))
    if cfg.task_type is None:
        cfg = cfg.replace(task_type=_infer_task_type(model))

    for p in model.parameters():
        p.requires_grad_(False)
    for name in res.targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoraLinear(
            base,
            cfg.rank_for(name),
            cfg.alpha_for(name),
            dropout=cfg.dropout,
            rslora=cfg.rslora,
            init=cfg.init,
            name=name,
            dora=cfg.use_dora,
        )
        setattr(parent, child, layer)
    _set_trainable(model, cfg, res.modules_to_save)
    if celora_specs:
        from lorakit import celora

        celora.install(model, {n: model.get_submodule(n) for n in celora_specs}, celora_specs, cfg.refresh_every)
    setattr(model, _STATE_ATTR, AdapterState(cfg, list(res.targets), list(res.modules_to_save), list(res.notes)))
    return model


def _plan_celora(model: nn.Module, cfg: LoraConfig, targets: list[str]):
    """CE-LoRA's per-layer plan, validated before anything is modified; with svd_rank="balanced"
    the approximated layers' trainable rank becomes int(7r/8) (recorded in rank_pattern)."""
    from lorakit.celora import balanced_rank, plan_layers

    shapes = {n: (*linear_shape(model.get_submodule(n)), cfg.rank_for(n)) for n in targets}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    specs = plan_layers(model_type, shapes, keep_ratio=cfg.keep_ratio, svd_rank=cfg.svd_rank, selection=cfg.selection)
    if cfg.svd_rank == "balanced":
        pattern = dict(cfg.rank_pattern)
        pattern.update({name: balanced_rank(cfg.rank_for(name)) for name in specs})
        cfg = cfg.replace(rank_pattern=pattern)
    return specs, cfg


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


def _set_trainable(model: nn.Module, cfg: LoraConfig, modules_to_save: list[str]) -> None:
    for name, param in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector"):
            param.requires_grad_(True)
        elif modules_to_save and _under(module_name, modules_to_save):
            param.requires_grad_(True)
        elif name.endswith("bias") and cfg.bias == "all":
            param.requires_grad_(True)
        elif name.endswith("base_layer.bias") and cfg.bias == "lora_only":
            param.requires_grad_(True)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W0 <- W0 + s B A); forward no longer pays for it."""
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
    """Remove the adapters and return the plain model, with them merged (default) or discarded.

    With ``merge=False`` and PiSSA, the base weights are restored to W0 (residual + s B0 A0).
    """
    state(model)
    from lorakit import celora

    celora.uninstall(model)
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
            if hasattr(layer, "pissa_A0"):
                layer._add_to_base(layer.scale * (layer.pissa_B0 @ layer.pissa_A0))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
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
    for name, layer in lora_layers(model):
        kind = "Conv1D" if layer.fan_in_fan_out else "Linear"
        n = layer.lora_A.weight.numel() + layer.lora_B.weight.numel() + (layer.out_features if layer.dora else 0)
        rows.append((name, kind, layer.in_features, layer.out_features, layer.r, layer.scale, n))
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return Summary(rows, trainable, total, st.modules_to_save, st.notes)
