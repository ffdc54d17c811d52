"""Adapter files in PEFT's format, both ways.

A directory with ``adapter_config.json`` (sorted keys) and ``adapter_model.safetensors``
(metadata {"format": "pt"}), tensor keys "base_model.model." + parameter path without the
adapter name, e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``
for the parameter ``...query.lora_A.default.weight`` (LoraLinear keeps PEFT's in-memory names).
A model with several named adapters is saved in PEFT's layout: "default" in the directory
itself, every other adapter in a subfolder of its name.

Loading is strict where PEFT is not: a missing key, an unknown key or a wrong shape is an
error naming the key, checked before the model is touched.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.adapters import variants
from lorakit.adapters.attach import DEFAULT, attach, check_adapter_name, is_adapter_parameter, is_attached, lora_layers, state
from lorakit.adapters.config import PEFT_FIELDS, LoraConfig
from lorakit.adapters.layer import LoraLinear
from lorakit.module_kinds import linear_shape
from lorakit.adapters.targets import Resolution, _under, compact_target_list, resolve
from lorakit.errors import AdapterFileError, ConfigError, LorakitError, closest
from lorakit.files import OutputError, write_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json fields that decide what the weights mean; the weights file records them, so a
# config from another save (an interrupted save, a hand edit) is refused instead of loaded wrongly.
WEIGHT_FIELDS = tuple(PEFT_FIELDS[f] for f in ("r", "alpha", "rslora", "use_dora", "targets", "rank_pattern",
                                                "alpha_pattern", "bias", "modules_to_save", "init",
                                                "layers_to_transform", "layers_pattern")) + ("fan_in_fan_out",)
SAVED_FIELDS_KEY = "lorakit_weights_config"


# ---------------------------------------------------------------------- what a model holds
def memory_key(file_key: str, adapter: str) -> str:
    """The parameter path of a file key: the adapter name goes back in (``lora_A.weight`` -> ``lora_A.default.weight``)."""
    for part in (".lora_A.", ".lora_B."):
        if part in file_key:
            return file_key.replace(part, f"{part}{adapter}.", 1)
    if file_key.endswith(".lora_magnitude_vector"):
        return f"{file_key}.{adapter}"
    return file_key


def adapter_tensors(model: nn.Module, adapter: str | None = None, *, convert_pissa: bool = True) -> dict[str, Tensor]:
    """The tensors of adapter ``adapter`` (default: the active one), keyed as in PEFT's files (parameter
    path without the adapter name, no "base_model.model." prefix).

    With ``convert_pissa`` an adapter whose variant rewrote the base weight is written for the original one
    (PiSSA: W0 = W_res + s B0 A0, ``variants.pissa``), so the file works on an unmodified base model.
    """
    st = state(model)
    name = st.active_name if adapter is None else adapter
    entry = st.entry(name)
    out: dict[str, Tensor] = {}
    for path, layer in lora_layers(model, name):
        tensors = layer.settings[name].variant.file_tensors(layer, name, convert=convert_pissa)
        out.update({f"{path}.{key}": value for key, value in tensors.items()})
    for pname, param in model.named_parameters():
        if is_adapter_parameter(pname):
            continue
        module_name = pname.rpartition(".")[0]
        if entry.modules_to_save and _under(module_name, entry.modules_to_save):
            out[pname] = param.detach()
        elif pname.endswith("bias") and entry.config.bias == "all":
            out[pname] = param.detach()
        elif pname.endswith("base_layer.bias") and entry.config.bias == "lora_only":
            out[pname] = param.detach()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, *, adapter: str | Sequence[str] | None = None,
                 convert_pissa: bool = True, metadata: dict[str, str] | None = None, labels: list[str] | None = None) -> Path:
    """Write the model's adapters (or ``adapter``: a name or a list of names) in PEFT's format to directory
    ``path`` (created if needed): "default" in ``path`` itself, any other name in ``path/<name>``, as PEFT's
    ``save_pretrained`` does. Returns ``path``.

    ``metadata`` (str -> str) is stored in the safetensors header next to {"format": "pt"}.
    ``labels``: a classifier's label names in the order of its outputs, recorded so that ``lorakit eval``
    can read the adapter (``lorakit train`` records them itself).
    Both files are written into a temporary directory first; a new directory is then renamed into
    place whole, an existing one gets the weights and then the config renamed in. The weights record
    the config fields that give them their meaning (WEIGHT_FIELDS), so a pair torn by a crash
    between the two renames is refused at load, never used.
    """
    st = state(model)
    path = Path(path)
    names = list(st.adapters) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    unknown = [n for n in names if n not in st.adapters]
    if unknown or not names:
        raise LorakitError(f"save_adapter(adapter={adapter!r}): the model has adapters {sorted(st.adapters)}")
    for name in names:  # attach refuses such names; a state edited by hand must not write outside ``path`` either
        check_adapter_name(name)
    if labels is not None and not are_label_names(labels):
        raise ConfigError(f"labels={labels!r} must be two or more distinct label names")
    if path.exists() and not path.is_dir():
        raise AdapterFileError(f"{path} exists and is not a directory; choose a directory for the adapter")
    for name in sorted(names, key=lambda n: n != DEFAULT):  # the directory itself first, then its subfolders
        _save_one(model, name, path if name == DEFAULT else path / name, convert_pissa, metadata, labels)
    return path


def _save_one(model: nn.Module, name: str, path: Path, convert_pissa: bool, metadata: dict[str, str] | None,
              labels: list[str] | None) -> None:
    entry = state(model).entry(name)
    cfg = variants.of(entry.config).saved_config(entry.config, convert_pissa)
    tensors = {PREFIX + k: v.to("cpu").contiguous() for k, v in adapter_tensors(model, name, convert_pissa=convert_pissa).items()}
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in lora_layers(model, name))
    doc = cfg.to_peft(compact_target_list(entry.targets, model, cfg), fan_in_fan_out)
    meta = {"format": "pt", "lorakit_version": lorakit_version(),
            SAVED_FIELDS_KEY: json.dumps({k: doc.get(k) for k in WEIGHT_FIELDS}, sort_keys=True)}
    if labels is not None:
        meta.update(lorakit_task="classify", lorakit_labels=json.dumps(list(labels)))
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    if path.exists() and not path.is_dir():
        raise AdapterFileError(f"{path} exists and is not a directory; choose a directory for adapter {name!r}")
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=meta)
        (tmp / CONFIG_NAME).write_text(text)

    try:
        write_directory(path, fill, first=(WEIGHTS_NAME, CONFIG_NAME))
    except OSError as exc:
        raise AdapterFileError(f"the adapter could not be saved: {exc.strerror or exc}") from None
    except OutputError as exc:
        raise AdapterFileError(f"the adapter could not be saved: {exc}") from None


def are_label_names(labels: Any) -> bool:
    """A classifier's label names as lorakit records them (lorakit_labels): two or more distinct strings."""
    return (isinstance(labels, (list, tuple)) and len(labels) >= 2 and all(isinstance(n, str) for n in labels)
            and len(set(labels)) == len(labels))


def lorakit_version() -> str:
    """lorakit's version as installed (the package metadata: importing the root package would import every layer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike) -> LoraConfig:
    """The LoraConfig stored in an adapter directory."""
    cfg_path = _adapter_dir(path) / CONFIG_NAME
    doc = _config_document(cfg_path)
    try:
        return LoraConfig.from_peft(doc, source=str(cfg_path))
    except ConfigError as exc:
        raise AdapterFileError(str(exc)) from None


def _config_document(cfg_path: Path) -> Any:
    if not cfg_path.is_file():
        raise AdapterFileError(f"{cfg_path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({type(exc).__name__}: {str(exc)[:100]}); the file is corrupt") from None
    except OSError as exc:
        raise AdapterFileError(f"{cfg_path} cannot be read: {exc.strerror or exc}") from None


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors without the "base_model.model." prefix, safetensors metadata)."""
    folder = _adapter_dir(path)
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            raw = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterFileError(f"{weights} is corrupt or truncated ({exc}); save the adapter again") from None
    elif (folder / "adapter_model.bin").is_file():
        try:
            raw = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise AdapterFileError(f"{folder / 'adapter_model.bin'} could not be read as a weights-only torch file "
                                   f"({first}); lorakit never runs pickled code: convert it to {WEIGHTS_NAME}") from None
        meta = {}
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()):
            raise AdapterFileError(f"{folder / 'adapter_model.bin'} holds a {type(raw).__name__}, not a dict of named "
                                   "tensors; it is not an adapter weights file")
    else:
        raise AdapterFileError(f"{weights} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if SAVED_FIELDS_KEY in meta:
        _check_same_save(folder, meta[SAVED_FIELDS_KEY])
    return {_normalise_key(k): v for k, v in raw.items()}, meta


def _check_same_save(folder: Path, recorded: str) -> None:
    """The weights were saved with the config fields they record; refuse a config that says otherwise."""
    doc = _config_document(folder / CONFIG_NAME)
    try:
        saved = json.loads(recorded)
    except ValueError:
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: its {SAVED_FIELDS_KEY} metadata is not JSON; the file is "
                               "damaged, save the adapter again") from None
    if not isinstance(doc, dict) or not isinstance(saved, dict):
        return  # read_config reports a config that is not an object
    differ = [k for k in WEIGHT_FIELDS if k in saved and _canonical(doc.get(k)) != _canonical(saved[k])]
    if differ:
        k = differ[0]
        raise AdapterFileError(
            f"{folder}: {CONFIG_NAME} says {k}={doc.get(k)!r} but {WEIGHTS_NAME} was saved with {k}={saved[k]!r} "
            f"({len(differ)} field(s) differ: {', '.join(differ)}); the two files come from different saves (an "
            "interrupted save, or a config edited by hand). Save the adapter again, or restore the matching config")


def _canonical(value: Any) -> Any:
    if isinstance(value, list):
        return sorted(json.dumps(v, sort_keys=True) for v in value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _adapter_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    if p.exists() and not p.is_dir():
        raise AdapterFileError(f"{p} is a file, not an adapter directory; pass the directory that holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not p.is_dir():
        raise AdapterFileError(f"adapter directory {p} does not exist")
    return p


def _normalise_key(key: str) -> str:
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    # PEFT's in-memory names carry the adapter name ("lora_A.default.weight"); files do not.
    key = key.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.").replace(".modules_to_save.default.", ".")


def _expected_shapes(model: nn.Module, cfg: LoraConfig, res: Resolution, adapter: str) -> dict[str, tuple[int, ...]]:
    """File key -> shape of every tensor adapter ``adapter`` with config ``cfg`` has on ``model``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in res.targets:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):
            in_f, out_f, base = module.in_features, module.out_features, module.base_layer
            r = module.settings[adapter].r if adapter in module.settings else cfg.rank_for(name)
        else:
            (in_f, out_f), r, base = linear_shape(module), cfg.rank_for(name), module
        shapes[f"{name}.lora_A.weight"] = (r, in_f)
        shapes[f"{name}.lora_B.weight"] = (out_f, r)
        shapes.update({f"{name}.{key}": shape for key, shape in variants.of(cfg).extra_shapes(in_f, out_f).items()})
        if cfg.bias == "lora_only" and base.bias is not None:
            shapes[f"{name}.base_layer.bias"] = tuple(base.bias.shape)
    targets = set(res.targets)
    for pname, param in model.named_parameters():
        if is_adapter_parameter(pname):
            continue
        module_name = pname.rpartition(".")[0]
        if res.modules_to_save and _under(module_name, res.modules_to_save):
            shapes[pname] = tuple(param.shape)
        elif cfg.bias == "all" and pname.endswith("bias"):
            if module_name in targets:
                pname = f"{module_name}.base_layer.bias"
            shapes[pname] = tuple(param.shape)
    return shapes


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter: str | None = None) -> nn.Module:
    """Load an adapter directory (ours or PEFT's) into ``model`` as adapter ``adapter`` and return ``model``.

    On a plain model the adapter is attached (named ``adapter``, default "default") and active. On an
    adapted model the file goes into the adapter of that name (default: the active one), or, for a new
    name, is added inactive beside the others, as PEFT's ``load_adapter(path, adapter_name)``; a
    subfolder of a several-adapter save is loaded by its path. Every key, and every shape, is checked
    before the model is modified: a missing key, an unknown key or a shape mismatch raises
    AdapterFileError naming the key.
    """
    folder = _adapter_dir(path)
    cfg = read_config(folder)
    tensors, _ = read_tensors(folder)
    attached = is_attached(model)
    name = (state(model).active_name if attached else DEFAULT) if adapter is None else adapter
    into_existing = attached and name in state(model).adapters
    if into_existing:
        entry = state(model).entry(name)
        res = Resolution(entry.targets, entry.modules_to_save, entry.notes)
        held, read = variants.of(entry.config).file_kind, variants.of(cfg).file_kind
        if held != read:
            raise AdapterFileError(f"{folder} holds {read} but the model's adapter {name!r} is {held}; call "
                                   "lorakit.unload(model, merge=False) first, load into the plain model, or load it "
                                   "under another name")
    else:
        res = resolve(model, cfg, strict_entries=False)
    expected = _expected_shapes(model, cfg, res, name)
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise AdapterFileError(
            f"{folder}: {len(unknown)} key(s) in the file match nothing this model would hold, first {unknown[0]!r} "
            f"(closest expected: {closest(unknown[0], expected)}); the adapter was made for a different model or targets"
        )
    if missing:
        raise AdapterFileError(
            f"{folder}: {len(missing)} expected key(s) missing from the file, first {missing[0]!r}; "
            "the file is incomplete or was made for different targets"
        )
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            raise AdapterFileError(
                f"{folder}: {key} has shape {list(got)} but this model needs {list(shape)}; "
                "the adapter was made for a different base model (or a different rank)"
            )
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterFileError(f"{folder}: {key} holds {value.dtype} values; adapter weights are floating point")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise AdapterFileError(f"{folder}: {key} holds {bad} NaN or infinite value(s); the adapter comes from a run "
                                   "that diverged. Use an earlier checkpoint, or retrain with a lower learning rate")
    if not into_existing:
        attach(model, cfg, name=name, resolution=res)
        entry = state(model).entry(name)
        entry.config = entry.config.replace(task_type=cfg.task_type)  # saved again, the config is the one that was read
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    _adopt_scales(model, cfg, name)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            target = params[memory_key(key, name)]
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    for layer in merged:
        layer.merge()
    return model


def _adopt_scales(model: nn.Module, cfg: LoraConfig, adapter: str) -> None:
    """The adapter takes the file's alpha, rsLoRA and dropout (the scale is never stored; unmerged layers only)."""
    for name, layer in lora_layers(model, adapter):
        layer.set_scale(cfg.alpha_for(name), cfg.rslora, adapter)
        layer.settings[adapter].dropout_p = cfg.dropout
    entry = state(model).entry(adapter)
    entry.config = entry.config.replace(alpha=cfg.alpha, alpha_pattern=cfg.alpha_pattern, rslora=cfg.rslora, dropout=cfg.dropout)
