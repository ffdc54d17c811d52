"""Using a trained adapter: evaluate it on data, merge it into a plain model directory, describe it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorakit.adapters import load_adapter, read_config, unload
from lorakit.adapters.io import CONFIG_NAME, WEIGHTS_NAME, read_tensors
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.train.data import BUILTIN_DATA, load_data
from lorakit.train.models import load_model, load_tokenizer
from lorakit.train.trainer import DEFAULT_MAX_LENGTH, TrainConfig, Trainer

_TASK_OF_PEFT = {"SEQ_CLS": "classify", "CAUSAL_LM": "causal-lm"}


def adapter_task(adapter: str | os.PathLike) -> tuple[str, list[str] | None, str | None]:
    """(task, label names or None, base model spec or None) recorded with an adapter."""
    cfg = read_config(adapter)
    _, meta = read_tensors(adapter)
    task = meta.get("lorakit_task") or _TASK_OF_PEFT.get(cfg.task_type or "")
    if task is None:
        raise AdapterFileError(f"{adapter}: task_type={cfg.task_type!r}; lorakit evaluates SEQ_CLS and CAUSAL_LM adapters")
    labels = json.loads(meta["lorakit_labels"]) if "lorakit_labels" in meta else None
    return task, labels, cfg.base_model


def load_with_adapter(adapter: str | os.PathLike, model: str | None = None):
    """(LoadedModel with the adapter loaded, task, label names)."""
    task, labels, base = adapter_task(adapter)
    spec = model or base
    if not spec:
        raise LorakitError(f"{adapter} does not name its base model; pass --model")
    if task == "classify" and labels is None:
        raise AdapterFileError(f"{adapter}: a classification adapter without label names (lorakit_labels metadata); "
                               "it was not written by lorakit train")
    loaded = load_model(spec, task, label_names=labels, tokenizer=load_tokenizer(spec))
    load_adapter(loaded.model, adapter)
    return loaded, task, labels


def evaluate_adapter(adapter: str, data: str | None = None, *, model: str | None = None, max_length: int | None = None,
                     batch_size: int = 64, text_column: str = "text", label_column: str = "label") -> dict[str, Any]:
    """Held-out metrics of an adapter: the built-in set's held-out split, or every row of a file."""
    loaded, task, labels = load_with_adapter(adapter, model)
    if data is None:
        data = next(f"builtin:{k}" for k, t in BUILTIN_DATA.items() if t == task)
    ds = load_data(data, task, loaded.tokenizer, max_length or DEFAULT_MAX_LENGTH[task], text_column=text_column,
                   label_column=label_column, label_names=labels, split=data.startswith("builtin:"))
    ds.train = ds.train or ds.eval[:1]  # the Trainer wants something to train on; evaluate() only reads eval
    cfg = TrainConfig(model=loaded.name, data=data, task=task, eval_batch_size=batch_size, out=tempfile.gettempdir(), quiet=True)
    trainer = Trainer(loaded.model, ds, cfg, pad_id=loaded.tokenizer.pad_token_id)
    return {"adapter": str(adapter), "model": loaded.name, "data": data, "rows": len(ds.eval), **trainer.evaluate()}


def merge_adapter(adapter: str, out: str, *, model: str | None = None, overwrite: bool = False) -> Path:
    """Write base + adapter, merged, as a plain Hugging Face model directory (loads without lorakit)."""
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise LorakitError(f"{out_path} exists and is not empty; choose another directory or pass --overwrite")
    loaded, _, _ = load_with_adapter(adapter, model)
    plain = unload(loaded.model, merge=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        plain.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def describe(adapter: str | os.PathLike) -> str:
    """A human-readable account of an adapter directory."""
    folder = Path(adapter)
    cfg = read_config(folder)
    tensors, meta = read_tensors(folder)
    lora = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    ranks = sorted({v.shape[0] for k, v in lora.items() if ".lora_A." in k})
    other = sorted(k for k in tensors if k not in lora)
    n_params = sum(v.numel() for v in tensors.values())
    lines = [
        f"adapter: {folder}",
        f"  format: PEFT LoRA ({CONFIG_NAME} + {WEIGHTS_NAME}, {(folder / WEIGHTS_NAME).stat().st_size:,} bytes)"
        if (folder / WEIGHTS_NAME).exists() else "  format: PEFT LoRA (adapter_model.bin)",
        f"  base model: {cfg.base_model or '(not recorded)'}; task: {meta.get('lorakit_task') or cfg.task_type or '(not recorded)'}",
        f"  rank r={cfg.r} (ranks present: {ranks}), alpha={cfg.alpha:g}, rslora={cfg.rslora}, dropout={cfg.dropout:g}, bias={cfg.bias}",
        f"  target_modules: {cfg.targets}; {len(modules)} adapted modules",
        f"  tensors: {len(tensors)} ({n_params:,} parameters)",
    ]
    if cfg.rank_pattern:
        lines.append(f"  rank_pattern: {cfg.rank_pattern}")
    if other:
        lines.append(f"  also trained: {', '.join(other[:8])}{' ...' if len(other) > 8 else ''}")
    if "lorakit_labels" in meta:
        lines.append(f"  labels: {json.loads(meta['lorakit_labels'])}")
    if "lorakit_version" in meta:
        lines.append(f"  written by lorakit {meta['lorakit_version']}")
    run = folder / "run.json"
    if run.is_file():
        try:
            rep = json.loads(run.read_text())
            after = rep.get("result", {}).get("after") or {}
            before = rep.get("result", {}).get("before") or {}
            lines.append(f"  training: {rep.get('result', {}).get('steps')} steps; held-out before {before}, after {after}")
        except (ValueError, AttributeError):
            lines.append("  run.json present but unreadable")
    ckpts = folder / "checkpoints"
    if ckpts.is_dir():
        names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
        if names:
            lines.append(f"  checkpoints: {', '.join(names)}")
    return "\n".join(lines)


def model_norms(model: str | None = None, adapter: str | None = None, data: str | None = None, *, rows: int = 8,
                max_length: int | None = None, attention: str | None = None, tolerance: float = 1e-3,
                text_column: str = "text", label_column: str = "label"):
    """``lorakit.limits.measure_norms`` on ``rows`` rows of data for a model (with an adapter, optionally).

    model defaults to the adapter's base model; data to the built-in set of the task.
    """
    from lorakit.limits import measure_norms, use_attention
    from lorakit.train.data import collate, infer_task
    from lorakit.train.models import builtin_default_task

    if rows <= 0:
        raise LorakitError(f"rows={rows} must be positive")
    if adapter is not None:
        loaded, task, labels = load_with_adapter(adapter, model)
        tokenizer = loaded.tokenizer
    elif model is None:
        raise LorakitError("give --model, --adapter, or both")
    else:
        loaded, labels = None, None
        task = infer_task(data) if data else (builtin_default_task(model) or "causal-lm")
        tokenizer = load_tokenizer(model)
    if data is None:
        data = next(f"builtin:{k}" for k, t in BUILTIN_DATA.items() if t == task)
    ds = load_data(data, task, tokenizer, max_length or DEFAULT_MAX_LENGTH[task], text_column=text_column,
                   label_column=label_column, label_names=labels, split=data.startswith("builtin:"))
    if loaded is None:
        loaded = load_model(model, task, label_names=ds.label_names, tokenizer=tokenizer)
    picked = (ds.eval or ds.train)[:rows]
    if not picked:
        raise LorakitError(f"{data} has no rows to measure on")
    batch = {k: v for k, v in collate(picked, loaded.tokenizer.pad_token_id).items() if k in ("input_ids", "attention_mask")}
    if attention is not None:
        use_attention(loaded.model, attention, tolerance)
    report = measure_norms(loaded.model, batch)
    report.model = loaded.name + (f" + {adapter}" if adapter else "")
    return report
