"""LoraConfig: what to adapt and how, validated on construction, round-tripped to PEFT's JSON.

A LoRA adapter replaces a frozen weight W (out x in) by W + s * B A with B (out x r),
A (r x in) and scale s = alpha / r, or s = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

from lorakit.adapters import variants
from lorakit.celora.plan import check_keep_ratio
from lorakit.celora.selector import SELECTIONS
from lorakit.errors import ConfigError
from lorakit.options import (
    build,
    group,
    option,
    parse_alpha_pattern,
    parse_keep_ratio,
    parse_layers,
    parse_name_list,
    parse_names,
    parse_rank_pattern,
    parse_regexes,
    parse_svd_rank,
    positive_int,
)

PRESETS = ("attn-qv", "attn-qkv", "all-linear")
INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
BACKWARDS = ("exact", "celora")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT adapter_config.json fields lorakit understands; every other field is ignored with a
# warning unless it asks for a feature lorakit does not implement (then loading refuses).
# LoraConfig's field -> PEFT's adapter_config.json key: the one place PEFT's field names are spelled.
PEFT_FIELDS = {"task_type": "task_type", "base_model": "base_model_name_or_path", "r": "r", "alpha": "lora_alpha",
               "rslora": "use_rslora", "targets": "target_modules", "exclude": "exclude_modules",
               "dropout": "lora_dropout", "bias": "bias", "use_dora": "use_dora", "init": "init_lora_weights",
               "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
               "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern"}
# PEFT's keys with no LoraConfig field: fixed by lorakit (peft_type, inference_mode), by the model (fan_in_fan_out),
# or PEFT's bookkeeping.
PEFT_ONLY = ("peft_type", "fan_in_fan_out", "inference_mode", "revision", "peft_version", "auto_mapping")
_PEFT_UNSUPPORTED = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}

# Fields PEFT writes with these values by default; they ask for nothing.
_PEFT_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The key of ``patterns`` that matches ``module_name`` the way PEFT matches rank_pattern.

    PEFT treats a key as a regex that must match a dotted suffix of the module path:
    ``re.match(rf"(.*\\.)?({key})$", module_name)``.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class CeloraConfig:
    """CE-LoRA (Chen et al. 2025): how the frozen-weight activation gradient G W0 of chosen layers is
    approximated by Double-LoRA plus selected output features, with ``LoraConfig(backward="celora")``.
    Training only, not written to adapter files (as PEFT groups LoftQ's options in LoftQConfig).

        dX ~= G_I W0[I, :] + (G - G_I-part) B0 A0    (I: the kept output features, B0 A0 the frozen rank-r0 SVD of W0)
    """

    keep_ratio: float | dict[str, float] | None = option(
        None, "fraction of output features kept in the backward: one number (every adapted layer but query/key/gate) "
        "or v_proj=0.55,down_proj=0.65", parse=parse_keep_ratio, metavar="RATIO",
        default_text="the architecture's preset: value/output 0.55, up/down 0.65")
    refresh_every: int = option(200, "optimizer steps between re-selections of the kept features")
    svd_rank: int | str | None = option(
        None, "rank r0 of the frozen Double-LoRA part: an integer (0 = none) or 'balanced' (trainable rank and r0 both "
        "int(7r/8))", parse=parse_svd_rank, metavar="R0", default_text="the adapter rank r")
    selection: str = option("score", "how features are kept: score (||G[:, i]|| ||R[i, :]||), weight (||R[i, :]||) or "
                            "sample (unbiased, proportional to the score)", choices=SELECTIONS)

    def __post_init__(self) -> None:
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every <= 0:
            raise ConfigError(f"refresh_every={self.refresh_every!r} must be a positive number of optimizer steps")
        if not (self.svd_rank is None or self.svd_rank == "balanced"
                or (isinstance(self.svd_rank, int) and not isinstance(self.svd_rank, bool) and self.svd_rank >= 0)):
            raise ConfigError(f"svd_rank={self.svd_rank!r} must be None, 'balanced' or an integer >= 0")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection={self.selection!r} is not one of {SELECTIONS}")
        ratios = self.keep_ratio.items() if isinstance(self.keep_ratio, dict) else [("", self.keep_ratio)]
        for key, value in ratios:
            if value is None and key == "":
                continue
            check_keep_ratio(f"keep_ratio[{key!r}]" if key else "keep_ratio", value)


@dataclass
class NormControl:
    """Norm control (Hu et al. 2025, Section 4): keep the adapted attention's logits under the almost-linear
    threshold. Training only, not written to adapter files."""

    cap: float | None = option(
        None, "after every optimizer step, clip the singular values of (alpha/r) B A to this value "
        "(lorakit.limits.cap_norms), so the adapter cannot raise a layer's query/key norms by more", flag="--norm-cap",
        metavar="CAP")

    def __post_init__(self) -> None:
        cap = self.cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)
                                or cap <= 0):
            raise ConfigError(f"norm_cap={cap!r} must be a positive number: the largest spectral norm "
                              "allowed for (alpha/r) B A, e.g. norm_cap=1.0")


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter: W (out x in) becomes W + s B A, B (out x r), A (r x in),
    s = alpha / r (alpha / sqrt(r) with rslora). Each field's help below is also its ``lorakit train`` flag's.

    PEFT semantics for targets, exclude, modules_to_save, rank_pattern / alpha_pattern (keys are regexes that
    match a dotted suffix of the module path), layers_to_transform / layers_pattern (the index is the first
    number in the module path after a segment matching layers_pattern, any segment when it is None; a list
    entry that is a full module path selects it whatever its layer; not with a regex target, as in PEFT).
    ``init="pissa"``: A, B from the top-r singular triplets of W, the residual W - s B A kept frozen
    (Meng et al. 2024). ``use_dora``: W' = m (W0 + s B A) / ||W0 + s B A||_row (Liu et al. 2024).
    ``celora`` and ``norm_control`` group the options of CE-LoRA and of norm control (training only).
    """

    r: int = option(8, "adapter rank r (at most min(in, out) of every target)", flag="--rank", parse=positive_int)
    alpha: float = option(16, "scale numerator: the adapter is multiplied by alpha / r (alpha / sqrt(r) with --rslora)")
    targets: str | list[str] = option(
        "attn-qv", "which layers get an adapter: attn-qv | attn-qkv | all-linear | a regex matched in full against "
        "module paths | comma-separated module names or dotted suffixes", parse=parse_names, metavar="TARGETS")
    dropout: float = option(0.0, "dropout probability on the adapter's input (0 <= p < 1)")
    bias: str = option("none", "which biases train: none, all, or lora_only (those of adapted layers)", choices=BIASES)
    rslora: bool = option(False, "scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)")
    init: str = option("kaiming", "initialisation: kaiming (A Kaiming-uniform, B = 0; PEFT's default), gaussian "
                       "(A ~ N(0, 1/r^2), B = 0) or pissa (from the top-r singular triplets of W)", choices=INITS)
    modules_to_save: list[str] | None = option(
        None, "modules trained in full, comma-separated (e.g. classifier); '' for none", parse=parse_name_list,
        metavar="NAMES", default_text="the task head of a classifier")
    exclude: str | list[str] | None = option(
        None, "modules never adapted: comma-separated names or dotted suffixes, or a regex matched in full",
        parse=parse_names, metavar="NAMES")
    rank_pattern: dict[str, int] = option(
        help="per-module ranks: name=r,name=r or a JSON file (rank-advice's advice.json, or {module: rank})",
        factory=dict, parse=parse_rank_pattern, metavar="PATTERN")
    alpha_pattern: dict[str, float] = option(
        help="per-module alphas: name=alpha,name=alpha or a JSON file {module: alpha}", factory=dict,
        parse=parse_alpha_pattern, metavar="PATTERN")
    use_dora: bool = option(False, "DoRA: also train a magnitude per output feature, W' = m (W0 + s B A) / "
                            "||W0 + s B A||_row (Liu et al. 2024; PEFT's use_dora)", flag="--dora")
    layers_to_transform: int | list[int] | None = option(
        None, "adapt the targets in these blocks only: 0-5, 0,2,4 or 0-3,8 (PEFT's layers_to_transform)",
        flag="--layers", parse=parse_layers, metavar="LAYERS")
    layers_pattern: str | list[str] | None = option(
        None, "the name (regex) of the block list --layers indexes: layers, layer (BERT), h (GPT-2), ...",
        parse=parse_regexes, metavar="NAME", default_text="the first numbered segment of a module's path")
    task_type: str | None = option(None, "PEFT task type written to adapter_config.json", choices=TASK_TYPES,
                                   default_text="from the model's class")
    base_model: str | None = option(None, "base model name or path written to adapter_config.json",
                                    default_text="--model, a local path made absolute")
    backward: str = option("exact", "the frozen-weight backward: exact, or celora (CE-LoRA, options below)",
                           choices=BACKWARDS)
    celora: CeloraConfig = group(CeloraConfig, "CE-LoRA (with --backward celora)")
    norm_control: NormControl = group(NormControl, "norm control (computational limits of LoRA)")

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.modules_to_save, (tuple, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for field_name, group_type in _GROUPS.items():
            if isinstance(getattr(self, field_name), dict):  # from JSON (run.json, a checkpoint)
                setattr(self, field_name, build(group_type, getattr(self, field_name)))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            _check_pattern_key("rank_pattern", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_pattern_key("alpha_pattern", key)
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        for field_name in ("rslora", "use_dora"):
            value = getattr(self, field_name)
            if not isinstance(value, bool):
                raise ConfigError(f"{field_name}={value!r} must be true or false")
        if not all(isinstance(getattr(self, f), group_type) for f, group_type in _GROUPS.items()):
            raise ConfigError(f"celora={self.celora!r} and norm_control={self.norm_control!r} must be a CeloraConfig and "
                              "a NormControl (lorakit.adapters.config)")
        if self.exclude is not None:
            _check_names_or_regex("exclude", self.exclude)
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ConfigError(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
        self._validate_layers()
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ConfigError(f"base_model={self.base_model!r} must be a model name or path (a string)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} is not a probability in [0, 1); use e.g. dropout=0.05")
        if self.bias not in BIASES:
            raise ConfigError(f"bias={self.bias!r} is not one of {BIASES}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is not one of {INITS}")
        if isinstance(self.targets, str):
            if not self.targets.strip():
                raise ConfigError("targets='' is empty; give a preset such as 'attn-qv', a regex, or module names")
            if self.targets not in PRESETS:
                try:
                    re.compile(self.targets)
                except re.error as exc:
                    raise ConfigError(f"targets={self.targets!r} is neither a preset {PRESETS} nor a valid regex: {exc}") from None
        elif isinstance(self.targets, list):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ConfigError(f"targets={self.targets!r} must be a non-empty list of module names")
        else:
            raise ConfigError(f"targets={self.targets!r} must be a preset name, a regex string or a list of module names")
        if self.backward not in BACKWARDS:
            raise ConfigError(f"backward={self.backward!r} is not one of {BACKWARDS}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type={self.task_type!r} is not one of {TASK_TYPES} or None")
        variants.of(self).validate(self)  # what the adapter's variants refuse (e.g. DoRA with PiSSA)

    def _validate_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not (isinstance(items, list) and items and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                             for i in items)):
                raise ConfigError(f"layers_to_transform={layers!r} must be a layer index >= 0 or a non-empty list of them "
                                  "(e.g. [0, 1, 2]; lorakit train --layers 0-2)")
            if isinstance(self.targets, str) and self.targets not in PRESETS:
                raise ConfigError(f"layers_to_transform cannot be used with the regex targets={self.targets!r} (PEFT "
                                  "refuses it too); give module names or a preset, or put the layers in the regex")
        if self.layers_pattern is not None:
            if layers is None:
                raise ConfigError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (which layers)")
            _check_names_or_regex("layers_pattern", self.layers_pattern)

    def layer_index(self, module_name: str) -> int | None:
        """The block index of ``module_name`` as layers_to_transform counts it: the number after a segment matching
        layers_pattern (any segment when it is None); None when the path has no such number."""
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else (self.layers_pattern or [])
        found = None
        if not patterns:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if found:
                break
        return None if found is None else int(found["idx"])

    def selects_layer(self, module_name: str) -> bool:
        """Whether ``module_name`` lies in a block of layers_to_transform (True when no layers are chosen)."""
        if self.layers_to_transform is None:
            return True
        index = self.layer_index(module_name)
        if index is None:
            return False
        wanted = self.layers_to_transform
        return index in (wanted if isinstance(wanted, list) else [wanted])

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    def scale_for(self, module_name: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    @property
    def variant(self) -> variants.Variant:
        """The adapter's variant (``lorakit.adapters.variants``): what it adds to plain LoRA, e.g. DoRA's magnitude."""
        return variants.of(self)

    # ------------------------------------------------------------------ PEFT JSON
    def to_peft(self, target_modules: list[str] | str, fan_in_fan_out: bool) -> dict[str, Any]:
        """The adapter_config.json document PEFT reads (target_modules already resolved)."""
        values = {"task_type": self.task_type, "base_model": self.base_model, "r": self.r, "alpha": self.alpha,
                  "rslora": self.rslora, "targets": target_modules, "exclude": self.exclude, "dropout": self.dropout,
                  "bias": self.bias, "use_dora": self.use_dora, "init": variants.peft_init(self.init),
                  "modules_to_save": self.modules_to_save or None, "rank_pattern": dict(self.rank_pattern),
                  "alpha_pattern": dict(self.alpha_pattern), "layers_to_transform": self.layers_to_transform,
                  "layers_pattern": self.layers_pattern}
        return {"peft_type": "LORA", **{PEFT_FIELDS[k]: v for k, v in values.items()},
                "fan_in_fan_out": fan_in_fan_out, "inference_mode": True}

    @classmethod
    def from_peft(cls, doc: dict[str, Any], source: str = "adapter_config.json") -> "LoraConfig":
        """Read a PEFT adapter_config.json document; refuse features lorakit does not implement."""
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(doc).__name__}")
        peft_type = doc.get("peft_type")
        if peft_type != "LORA":
            raise ConfigError(f"{source}: peft_type={peft_type!r}; lorakit reads LoRA adapters only (peft_type 'LORA')")
        for key, neutral in _PEFT_UNSUPPORTED.items():
            value = doc.get(key, neutral)
            if value not in (neutral, [], {}, False, None):
                raise ConfigError(f"{source}: {key}={value!r} is a PEFT feature lorakit does not implement")
        _check_field_types(doc, source)

        def get(field: str, default: Any = None) -> Any:
            return doc.get(PEFT_FIELDS[field], default)

        init_value = get("init", True)
        init = variants.init_from_peft(init_value)  # True/False/None: kaiming (the weights come from the file)
        if init is None:
            raise ConfigError(f"{source}: init_lora_weights={init_value!r} is not supported (kaiming, gaussian, pissa)")
        target_modules = get("targets")
        if target_modules in (None, [], ""):
            raise ConfigError(f"{source}: target_modules is empty; the file does not say which modules it adapts")
        if target_modules == "all-linear":
            target_modules = "all-linear"
        known = set(PEFT_FIELDS.values()) | set(PEFT_ONLY) | set(_PEFT_UNSUPPORTED)
        ignored = sorted(
            k for k, v in doc.items() if k not in known and v not in (None, [], {}, False) and _PEFT_DEFAULTS.get(k) != v
        )
        if ignored:
            warnings.warn(f"{source}: ignoring PEFT fields lorakit does not use: {ignored}", stacklevel=2)
        try:
            return cls(
                r=get("r", 8),
                alpha=get("alpha", 8),
                targets=target_modules if isinstance(target_modules, str) else list(target_modules),
                dropout=float(get("dropout", 0.0) or 0.0),
                bias=get("bias", "none") or "none",
                rslora=get("rslora") or False,
                use_dora=bool(get("use_dora")),
                init=init,
                # A file's null means "no modules to save", not "pick the task head automatically".
                modules_to_save=list(get("modules_to_save") or []),
                exclude=get("exclude") or None,
                rank_pattern=get("rank_pattern") or {},
                alpha_pattern=get("alpha_pattern") or {},
                # PEFT treats an empty list as "every layer"
                layers_to_transform=get("layers_to_transform") if get("layers_to_transform") != [] else None,
                layers_pattern=get("layers_pattern") or None,
                task_type=get("task_type"),
                base_model=get("base_model"),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed value: {exc}") from None


_GROUPS = {"celora": CeloraConfig, "norm_control": NormControl}  # LoraConfig's nested option groups


def _check_pattern_key(field_name: str, key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{field_name} key {key!r} must be a module name or regex")
    try:
        re.compile(key)
    except re.error as exc:
        raise ConfigError(f"{field_name} key {key!r} is not a valid regex ({exc}); escape special characters with \\") from None


def _check_names_or_regex(field_name: str, value: Any) -> None:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{field_name}={value!r} is not a valid regex ({exc}); give a regex or a list of names") from None
    elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"{field_name}={value!r} must be a regex string or a list of module names")


# The JSON types each adapter_config.json field may have (None is allowed for all of them).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **{PEFT_FIELDS[f]: types for f, types in {
        "rslora": (bool,), "use_dora": (bool,), "r": (int,), "alpha": (int, float), "dropout": (int, float),
        "bias": (str,), "task_type": (str,), "base_model": (str,), "targets": (str, list), "exclude": (str, list),
        "modules_to_save": (list,), "rank_pattern": (dict,), "alpha_pattern": (dict,), "init": (bool, str),
        "layers_to_transform": (int, list), "layers_pattern": (str, list)}.items()},
    "fan_in_fan_out": (bool,), "inference_mode": (bool,), "lora_bias": (bool,), "peft_type": (str,), "revision": (str,),
}
_LIST_OF_INTS = {"layers_to_transform"}
_JSON_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _check_field_types(doc: dict[str, Any], source: str) -> None:
    """Each known field has its JSON type: "use_rslora": "false" is refused, not read as true."""
    for key, types in _FIELD_TYPES.items():
        value = doc.get(key)
        if value is None:
            continue
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        element = int if key in _LIST_OF_INTS else str
        if ok and isinstance(value, list):
            ok = all(isinstance(v, element) and not isinstance(v, bool) for v in value)
        if not ok:
            of = " of integers" if element is int else " of strings"
            expected = "a number" if types == (int, float) else \
                " or ".join(_JSON_NAMES[t] for t in types) + (of if list in types else "")
            raise ConfigError(f"{source}: {key}={value!r} must be {expected}, not {type(value).__name__}; fix the file")


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer (e.g. 8)")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive number (commonly 2 * r)")
