"""``lorakit info``: a human-readable account of an adapter directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.adapters import read_config
from lorakit.adapters.io import CONFIG_NAME, WEIGHTS_NAME, read_tensors
from lorakit.errors import AdapterFileError


def describe(adapter: str | os.PathLike) -> str:
    """A human-readable account of an adapter directory."""
    folder = Path(adapter)
    cfg = read_config(folder)
    tensors, meta = read_tensors(folder)
    lora = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
    flat = next((k for k, v in lora.items() if v.dim() != 2), None)
    if flat is not None:
        raise AdapterFileError(f"{folder}: {flat} has shape {list(lora[flat].shape)}; a LoRA factor is a matrix. The file "
                               "is damaged or is not a LoRA adapter")
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
        try:
            labels: Any = json.loads(meta["lorakit_labels"])
        except (ValueError, RecursionError):
            labels = f"{meta['lorakit_labels'][:80]!r} (not JSON: damaged)"
        lines.append(f"  labels: {labels}")
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
    named = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())
    if named:  # PEFT's layout for a several-adapter save: each other adapter in a subfolder of its name
        lines.append(f"  other named adapters here: {', '.join(named)} (load one with "
                     f"lorakit.load_adapter(model, {str(folder / named[0])!r}, adapter={named[0]!r}))")
    ckpts = folder / "checkpoints"
    if ckpts.is_dir():
        names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
        if names:
            lines.append(f"  checkpoints: {', '.join(names)}")
    return "\n".join(lines)
