"""LoraConfig: what to adapt and how, validated on construction, round-tripped to PEFT's JSON.

A LoRA adapter replaces a frozen weight W (out x in) by W + s * B A with B (out x r),
A (r x in) and scale s = alpha / r, or s = alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError

PRESETS = ("attn-qv", "attn-qkv", "all-linear")
INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
BACKWARDS = ("exact", "celora")
SELECTIONS = ("score", "weight", "sample")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT adapter_config.json fields lorakit understands; every other field is ignored with a
# warning unless it asks for a feature lorakit does not implement (then loading refuses).
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
class LoraConfig:
    """Configuration of a LoRA adapter.

    Args:
        r: adapter rank (r >= 1; at most min(in, out) of every target, checked at attach).
        alpha: scale numerator; the adapter is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        targets: a preset ("attn-qv", "attn-qkv", "all-linear"), a regex string matched in full
            against module paths, or a list of module paths or dotted suffixes.
        dropout: dropout probability on the adapter's input (0 <= p < 1).
        bias: which biases train: "none", "all", or "lora_only" (biases of adapted layers).
        rslora: use alpha / sqrt(r) as the scale (rank-stabilised LoRA).
        init: "kaiming" (A Kaiming-uniform, B = 0; PEFT's default), "gaussian"
            (A ~ N(0, 1/r^2), B = 0) or "pissa" (A, B from the top-r singular triplets of W,
            the residual W - s B A kept frozen; Meng et al. 2024).
        modules_to_save: extra modules trained in full (e.g. a classifier head).
        exclude: module paths, suffixes or a full-match regex never adapted.
        rank_pattern / alpha_pattern: per-module rank / alpha overrides, keyed like PEFT
            (a regex that must match a dotted suffix of the module path).
        use_dora: DoRA (Liu et al. 2024): W' = m (W0 + s B A) / ||W0 + s B A||_row with a trained
            magnitude m per output feature (see lorakit.adapters.layer).
        layers_to_transform: adapt only the blocks with these indices (an int or a list), PEFT's
            semantics: the index is the first number in the module path after a segment matching
            ``layers_pattern`` (any segment when it is None), e.g. ``model.layers.3.self_attn.q_proj``.
            With a preset or a list of names; not with a regex (PEFT refuses that too). A list entry
            that is a module's full path selects it whatever its layer.
        layers_pattern: the name (regex) of the block list, e.g. "layers", "layer" (BERT) or "h" (GPT-2).
        task_type: PEFT task type written to adapter_config.json (e.g. "SEQ_CLS", "CAUSAL_LM").
        base_model: name or path of the base model, written to adapter_config.json.

    CE-LoRA (Chen et al. 2025; training only, not written to adapter files):
        backward: "exact", or "celora" to approximate the frozen-weight activation gradient
            G W0 of chosen layers by Double-LoRA plus selected output features.
        keep_ratio: None (the architecture's preset: value/output/up/down projections), one
            float for every adapted layer but query/key/gate, or {module suffix: ratio}.
        refresh_every: optimizer steps between re-selections of the kept features.
        svd_rank: rank r0 of the frozen SVD part: None (= r), an int (0 = none) or "balanced"
            (trainable rank and r0 both int(7r/8) on approximated layers).
        selection: "score" (||G[:, i]|| * ||R[i, :]||), "weight" (||R[i, :]|| only) or
            "sample" (unbiased sampling proportional to the score).

    Norm control (Hu et al. 2025; training only, not written to adapter files):
        norm_cap: after every optimizer step, the singular values of (alpha/r) B A above this
            value are clipped to it (``lorakit.limits.cap_norms``), so the adapter cannot push a
            layer's query/key norms past the almost-linear threshold by more than the cap.
    """

    r: int = 8
    alpha: float = 16
    targets: str | list[str] = "attn-qv"
    dropout: float = 0.0
    bias: str = "none"
    rslora: bool = False
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    exclude: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    task_type: str | None = None
    base_model: str | None = None
    backward: str = "exact"
    keep_ratio: float | dict[str, float] | None = None
    refresh_every: int = 200
    svd_rank: int | str | None = None
    selection: str = "score"
    norm_cap: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.modules_to_save, (tuple, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
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
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"rslora={self.rslora!r} must be true or false")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora={self.use_dora!r} must be true or false")
        if self.use_dora and self.init == "pissa":
            raise ConfigError("use_dora=True with init='pissa' is not supported; use init='kaiming' or 'gaussian'")
        if self.use_dora and self.norm_cap is not None:
            raise ConfigError("norm_cap with use_dora=True: the cap bounds s B A, but DoRA also rescales every row of "
                              "W0 + s B A by its trained magnitude, so the cap would certify nothing; drop one of them")
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
        if self.norm_cap is not None and (isinstance(self.norm_cap, bool) or not isinstance(self.norm_cap, (int, float))
                                          or not math.isfinite(self.norm_cap) or self.norm_cap <= 0):
            raise ConfigError(f"norm_cap={self.norm_cap!r} must be a positive number: the largest spectral norm "
                              "allowed for (alpha/r) B A, e.g. norm_cap=1.0")
        if self.backward not in BACKWARDS:
            raise ConfigError(f"backward={self.backward!r} is not one of {BACKWARDS}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection={self.selection!r} is not one of {SELECTIONS}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every <= 0:
            raise ConfigError(f"refresh_every={self.refresh_every!r} must be a positive number of optimizer steps")
        if not (self.svd_rank is None or self.svd_rank == "balanced"
                or (isinstance(self.svd_rank, int) and not isinstance(self.svd_rank, bool) and self.svd_rank >= 0)):
            raise ConfigError(f"svd_rank={self.svd_rank!r} must be None, 'balanced' or an integer >= 0")
        ratios = self.keep_ratio.items() if isinstance(self.keep_ratio, dict) else [("", self.keep_ratio)]
        for key, value in ratios:
            if value is None and key == "":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                where = f"keep_ratio[{key!r}]" if key else "keep_ratio"
                raise ConfigError(f"{where}={value!r} must be in (0, 1]: the fraction of output features kept in the backward")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type={self.task_type!r} is not one of {TASK_TYPES} or None")

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

    def selects_layer(self, module_name: str) -> bool:
        """Whether ``module_name`` lies in a block of layers_to_transform (True when no layers are chosen)."""
        if self.layers_to_transform is None:
            return True
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else (self.layers_pattern or [])
        found = None
        if not patterns:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if found:
                break
        if found is None:
            return False
        wanted = self.layers_to_transform
        return int(found["idx"]) in (wanted if isinstance(wanted, list) else [wanted])

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

    # ------------------------------------------------------------------ PEFT JSON
    def to_peft(self, target_modules: list[str] | str, fan_in_fan_out: bool) -> dict[str, Any]:
        """The adapter_config.json document PEFT reads (target_modules already resolved)."""
        init: Any = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}[self.init]
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "use_rslora": self.rslora,
            "target_modules": target_modules,
            "exclude_modules": self.exclude,
            "lora_dropout": self.dropout,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": self.bias,
            "use_dora": self.use_dora,
            "init_lora_weights": init,
            "modules_to_save": self.modules_to_save or None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "inference_mode": True,
        }

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
        init_value = doc.get("init_lora_weights", True)
        if init_value in (True, False, None):
            init = "kaiming"  # weights come from the file; the init only matters for PiSSA's residual
        elif isinstance(init_value, str) and init_value.lower() == "gaussian":
            init = "gaussian"
        elif isinstance(init_value, str) and init_value.startswith("pissa"):
            init = "pissa"
        else:
            raise ConfigError(f"{source}: init_lora_weights={init_value!r} is not supported (kaiming, gaussian, pissa)")
        target_modules = doc.get("target_modules")
        if target_modules in (None, [], ""):
            raise ConfigError(f"{source}: target_modules is empty; the file does not say which modules it adapts")
        if target_modules == "all-linear":
            target_modules = "all-linear"
        known = {
            "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "use_rslora",
            "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out", "bias",
            "init_lora_weights", "modules_to_save", "rank_pattern", "alpha_pattern", "inference_mode",
            "layers_to_transform", "layers_pattern", "use_dora",
            "revision", "peft_version", "auto_mapping",
        } | set(_PEFT_UNSUPPORTED)
        ignored = sorted(
            k for k, v in doc.items() if k not in known and v not in (None, [], {}, False) and _PEFT_DEFAULTS.get(k) != v
        )
        if ignored:
            warnings.warn(f"{source}: ignoring PEFT fields lorakit does not use: {ignored}", stacklevel=2)
        try:
            return cls(
                r=doc.get("r", 8),
                alpha=doc.get("lora_alpha", 8),
                targets=target_modules if isinstance(target_modules, str) else list(target_modules),
                dropout=float(doc.get("lora_dropout", 0.0) or 0.0),
                bias=doc.get("bias", "none") or "none",
                rslora=doc.get("use_rslora") or False,
                use_dora=doc.get("use_dora") or False,
                init=init,
                # A file's null means "no modules to save", not "pick the task head automatically".
                modules_to_save=list(doc.get("modules_to_save") or []),
                exclude=doc.get("exclude_modules") or None,
                rank_pattern=doc.get("rank_pattern") or {},
                alpha_pattern=doc.get("alpha_pattern") or {},
                # PEFT treats an empty list as "every layer"
                layers_to_transform=doc.get("layers_to_transform") if doc.get("layers_to_transform") != [] else None,
                layers_pattern=doc.get("layers_pattern") or None,
                task_type=doc.get("task_type"),
                base_model=doc.get("base_model_name_or_path"),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed value: {exc}") from None


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
    "use_rslora": (bool,), "fan_in_fan_out": (bool,), "inference_mode": (bool,), "use_dora": (bool,),
    "lora_bias": (bool,), "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "bias": (str,),
    "task_type": (str,), "base_model_name_or_path": (str,), "peft_type": (str,), "target_modules": (str, list),
    "exclude_modules": (str, list), "modules_to_save": (list,), "rank_pattern": (dict,), "alpha_pattern": (dict,),
    "init_lora_weights": (bool, str), "revision": (str,), "layers_to_transform": (int, list),
    "layers_pattern": (str, list),
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
