"""Norm diagnostics: which side of the sqrt(log L) threshold each attention layer and head is on.

One forward pass without gradients, with hooks on the query/key/value projections (adapters
included) and on the attention function itself (after rotary embeddings). Per layer and head:

- q_max, k_max, v_max: max |entry| of X W_Q, X W_K, X W_V over the real (unpadded) tokens;
- q_share, k_share, v_share: max |entry| of the adapter term (alpha/r) X B A over that of the
  whole projection (None where the projection has no adapter);
- max_logit: max |beta q_i . k_j| over the positions the head attends to (exact, O(L^2));
- logit_bound: beta max_i ||q_i|| max_j ||k_j||, the O(L d) certificate that lorakit's "auto"
  attention uses (max_logit <= logit_bound always);
- threshold: sqrt(log L) for the batch's length L;
- regime: "below threshold" when max_logit < sqrt(log L) (Hu et al. 2025: the LoRA gradient is
  almost-linear-time computable when the logit entries are o(sqrt(log L)), and not when they
  grow like sqrt(log L) or faster), else "above threshold";
- attention: the implementation lorakit attention chose for the layer in this pass, if used.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.files import write_atomic
from lorakit.adapters.layer import LoraLinear
from lorakit.architectures import GUESSED_PROJECTIONS, fused_projection, model_type_of, separate_projections
from lorakit.errors import ModelError
from lorakit.limits.attention import key_padding_and_causal
from lorakit.speed.attention import attention_modules

BELOW, ABOVE = "below threshold", "above threshold"


@dataclass
class HeadNorms:
    layer: str
    head: int
    q_max: float | None = None
    k_max: float | None = None
    v_max: float | None = None
    q_share: float | None = None
    k_share: float | None = None
    v_share: float | None = None
    max_logit: float = math.nan
    logit_bound: float = math.nan
    threshold: float = math.nan
    regime: str = ""
    attention: str | None = None


@dataclass
class NormReport:
    length: int
    threshold: float
    rows: list[HeadNorms]
    model: str = ""
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ views
    def layers(self) -> list[dict[str, Any]]:
        """Per layer: the worst head of every column."""
        out = []
        for name in dict.fromkeys(r.layer for r in self.rows):
            rows = [r for r in self.rows if r.layer == name]
            agg: dict[str, Any] = {"layer": name, "heads": len(rows)}
            for col in ("q_max", "k_max", "v_max", "q_share", "k_share", "v_share", "max_logit", "logit_bound"):
                vals = [getattr(r, col) for r in rows if getattr(r, col) is not None and not math.isnan(getattr(r, col))]
                agg[col] = max(vals) if vals else None
            agg["threshold"] = self.threshold
            agg["heads_above"] = sum(r.regime == ABOVE for r in rows)
            agg["regime"] = ABOVE if agg["heads_above"] else BELOW
            agg["attention"] = rows[0].attention
            out.append(agg)
        return out

    def table(self, by: str = "head") -> str:
        """A fixed-width text table, one row per layer and head (by="head") or per layer (by="layer")."""
        if by not in ("head", "layer"):
            raise ValueError(f"by={by!r}: use 'head' or 'layer'")
        rows = [asdict(r) for r in self.rows] if by == "head" else self.layers()
        cols = ["layer"] + (["head"] if by == "head" else ["heads_above"]) + [
            "q_max", "k_max", "v_max", "q_share", "k_share", "v_share", "max_logit", "logit_bound", "regime"]
        if any(r.get("attention") for r in rows):
            cols.append("attention")
        fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
        cells = [[fmt(r.get(c)) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
        head = f"L = {self.length}, sqrt(log L) = {self.threshold:.3f}" + (f" ({self.model})" if self.model else "")
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        below = sum(r.regime == BELOW for r in self.rows)
        lines.append(f"{below} of {len(self.rows)} heads below threshold (max |beta q.k| < sqrt(log L)); "
                     f"certified (logit bound < threshold): {sum(r.logit_bound < self.threshold for r in self.rows)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "length": self.length, "threshold": self.threshold,
                "rows": [asdict(r) for r in self.rows], "layers": self.layers(), "notes": self.notes}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1, default=_json_default)
        write_atomic(path, lambda tmp: Path(tmp).write_text(text))
        return path

    def plot(self, path: str | Path) -> Path:
        """Heat-maps (layer x head) of max logit and certified bound relative to sqrt(log L), log10 scale."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = list(dict.fromkeys(r.layer for r in self.rows))
        heads = max(r.head for r in self.rows) + 1
        fig, axes = plt.subplots(1, 2, figsize=(min(4 + 0.5 * heads, 12) * 2, 2.5 + 0.3 * len(layers)), squeeze=False)
        for ax, col, title in zip(axes[0], ("max_logit", "logit_bound"), ("max |beta q.k|", "certified bound beta max||q|| max||k||")):
            grid = torch.full((len(layers), heads), math.nan)
            for r in self.rows:
                grid[layers.index(r.layer), r.head] = math.log10(max(getattr(r, col), 1e-12) / self.threshold)
            lim = max(1.0, float(grid.nan_to_num(0).abs().max()))
            im = ax.imshow(grid.numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_yticks(range(len(layers)), [_short(n) for n in layers], fontsize=7)
            ax.set_xlabel("head")
            ax.set_title(f"{title}\nlog10 of ratio to sqrt(log L) = {self.threshold:.2f} (red: above)", fontsize=9)
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{self.model or 'model'}: attention logits against the threshold, L = {self.length}")
        fig.tight_layout()
        path = Path(path)
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        return path


def _json_default(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else str(v)


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if p not in ("model", "bert", "encoder", "decoder", "transformer", "attention")) or name


# ---------------------------------------------------------------------- finding projections
def projections(model: nn.Module, attention: dict[str, nn.Module]) -> dict[str, dict[str, tuple[nn.Module, int]]]:
    """For each attention module: {"q"|"k"|"v": (projection module, index among a fused q/k/v output)}."""
    model_type = model_type_of(model)
    names, fused = separate_projections(model_type), fused_projection(model_type)
    out: dict[str, dict[str, tuple[nn.Module, int]]] = {}
    for name, attn in attention.items():
        # BERT-style: the projections are children of the module that calls attention
        found: dict[str, tuple[nn.Module, int]] = {}
        for child_name, child in attn.named_children():
            if names and child_name in names:
                found["qkv"[names.index(child_name)]] = (child, -1)
            elif not names:
                for mu in "qkv":
                    if child_name in GUESSED_PROJECTIONS[mu]:
                        found[mu] = (child, -1)
            if child_name == fused or (not names and not fused and child_name in GUESSED_PROJECTIONS["fused"]):
                found = {mu: (child, i) for i, mu in enumerate("qkv")}
        out[name] = found
    return out


def _head_max(t: Tensor, heads: int, valid: Tensor | None) -> Tensor:
    """max |entry| per head of a [B, L, heads * d] projection over the valid tokens -> [heads]."""
    t = t.detach().float()
    if valid is not None and valid.shape == t.shape[:2]:
        t = t * valid[..., None].to(t.device)
    b, length, width = t.shape
    return t.abs().reshape(b * length, heads, width // heads).amax(dim=(0, 2))


@torch.no_grad()
def measure_norms(model: nn.Module, batch: dict[str, Tensor] | Tensor, *, chunk: int = 1024) -> NormReport:
    """One forward pass (no grad, dropout off) with hooks; see the module docstring for the columns.

    batch: the model's keyword inputs (input_ids, attention_mask, ...) or a tensor of input ids.
    """
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or not batch:
        raise ValueError("batch must be a dict of model inputs (input_ids, attention_mask, ...) or an input-id tensor")
    attention = attention_modules(model)
    if not attention or not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"{type(model).__name__}: no attention modules that use transformers' AttentionInterface; "
                         "measure_norms needs a transformers model")
    valid = batch.get("attention_mask")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    proj = projections(model, attention)
    stats: dict[str, dict[str, Any]] = {name: {} for name in attention}
    handles = []
    for name, found in proj.items():
        for mu, (module, index) in found.items():
            handles.append(module.register_forward_hook(functools.partial(_projection_hook, stats[name], mu, index, valid)))
    names = {id(m): n for n, m in attention.items()}
    original = model.config._attn_implementation
    wrapper = _register_measuring(original, names, stats, valid, chunk)
    was_training = model.training
    model.eval()
    try:
        model.set_attn_implementation(wrapper)
        model(**batch)
    finally:
        model.set_attn_implementation(original)
        model.train(was_training)
        for h in handles:
            h.remove()
    length = int(batch["input_ids"].shape[-1]) if "input_ids" in batch else max(s.get("length", 0) for s in stats.values())
    threshold = math.sqrt(math.log(length)) if length > 1 else math.nan
    rows, notes, gqa = [], [], None
    for name, s in stats.items():
        if "logit" not in s:
            notes.append(f"{name} did not call the attention function in this pass")
            continue
        heads, kv_heads = s["logit"].numel(), s["k_norm"].numel()
        for h in range(heads):
            row = HeadNorms(layer=name, head=h, max_logit=float(s["logit"][h]), logit_bound=float(s["bound"][h]),
                            threshold=threshold, attention=s.get("impl"))
            for mu in "qkv":
                per = s.get(f"{mu}_max")
                if per is None:
                    continue
                idx = h if per.numel() == heads else h * per.numel() // heads
                setattr(row, f"{mu}_max", float(per[idx]))
                if f"{mu}_adapter" in s:
                    setattr(row, f"{mu}_share", float(s[f"{mu}_adapter"][idx] / per[idx].clamp_min(1e-30)))
            row.regime = BELOW if row.max_logit < threshold else ABOVE
            rows.append(row)
        if kv_heads != heads:
            gqa = f"grouped-query attention: {heads} query heads share {kv_heads} key/value heads"
    if not rows:
        raise ModelError(f"{type(model).__name__}: no attention call was observed; is the batch empty?")
    if gqa:
        notes.append(gqa)
    if not any(proj.values()):
        notes.append("no separate or fused q/k/v projections were found: q_max/k_max/v_max are not available")
    return NormReport(length, threshold, rows, getattr(model.config, "_name_or_path", "") or type(model).__name__, notes)


def _projection_hook(store: dict, mu: str, index: int, valid: Tensor | None, module: nn.Module, args, output) -> None:
    out = output if index < 0 else output.chunk(3, dim=-1)[index]
    store[f"_{mu}_out"] = out
    if isinstance(module, LoraLinear) and module.enabled and not module.merged and module.active_adapters:
        x = args[0]
        delta = module.adapter_delta(x)
        if index >= 0:
            delta = delta.chunk(3, dim=-1)[index]
        store[f"_{mu}_delta"] = delta
    store.setdefault("_valid", valid)


def _finish_projections(store: dict, head_dim: int) -> None:
    for mu in "qkv":
        out = store.pop(f"_{mu}_out", None)
        if out is None:
            continue
        heads = out.shape[-1] // head_dim
        valid = store.get("_valid")
        store[f"{mu}_max"] = _head_max(out, heads, valid)
        delta = store.pop(f"_{mu}_delta", None)
        if delta is not None:
            store[f"{mu}_adapter"] = _head_max(delta, heads, valid)


def _register_measuring(original: str, names: dict[int, str], stats: dict, valid: Tensor | None, chunk: int) -> str:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    functions, masks = AttentionInterface(), AttentionMaskInterface()
    inner = functions[original] if original in functions else sdpa_attention_forward
    mask_fn = masks[original] if original in masks else sdpa_mask

    def measuring(module, query, key, value, attention_mask, *args, **kwargs):
        store = stats.get(names.get(id(module), ""), None)
        if store is not None:
            _measure_attention(store, module, query, key, value, attention_mask, kwargs, valid, chunk)
        out = inner(module, query, key, value, attention_mask, *args, **kwargs)
        policy = getattr(module, "lorakit_attention", None)
        if store is not None and policy is not None and policy.last and original.startswith("lorakit_"):
            store["impl"] = policy.last["impl"]
        return out

    name = f"lorakit_measure_{original}"
    AttentionInterface.register(name, measuring)
    AttentionMaskInterface.register(name, mask_fn)
    return name


def _measure_attention(store, module, q, k, v, mask, kwargs, valid, chunk) -> None:
    _finish_projections(store, q.shape[-1])
    scale = kwargs.get("scaling")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    q, k = q.float(), k.float()
    qn, kn = q.norm(dim=-1), k.norm(dim=-1)  # [B, H, L]
    if valid is not None and valid.shape[-1] == lk and lq == lk:
        vm = valid.to(q.device).bool()[:, None, :]
        qn, kn = qn * vm, kn * vm
    store["q_norm"], store["k_norm"] = qn.amax(dim=(0, 2)), kn.amax(dim=(0, 2))
    store["bound"] = scale * store["q_norm"] * store["k_norm"].repeat_interleave(g)
    is_causal = kwargs.get("is_causal")
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and lq > 1 \
        and (mask is None or mask.dim() == 2)
    allowed = key_padding_and_causal(mask, causal, b, lq, lk).to(q.device)
    if valid is not None and valid.shape[-1] == lq:  # padded queries do not count either
        allowed = allowed & valid.to(q.device).bool()[:, None, :, None]
    kx = k.repeat_interleave(g, dim=1)
    best = torch.zeros(hq, device=q.device)
    for start in range(0, lq, chunk):
        s = scale * q[:, :, start:start + chunk] @ kx.transpose(-1, -2)
        ok = allowed[..., start:start + chunk, :] if allowed.shape[-2] > 1 else allowed
        s = s.abs().masked_fill(~ok.expand_as(s), 0.0)
        best = torch.maximum(best, s.amax(dim=(0, 2, 3)))
    store["logit"] = best.cpu()
    store["bound"] = store["bound"].cpu()
    store["k_norm"] = store["k_norm"].cpu()
    store["length"] = lk


@torch.no_grad()
def rescale_query_key(model: nn.Module, batch: dict[str, Tensor] | Tensor, max_logit_bound: float, *,
                      rounds: int = 6, match: bool = False) -> dict[str, float]:
    """Make a norm-controlled variant in place: scale each layer's query and key projections by
    sqrt(c_l) (c_l <= 1; weights, biases and adapters alike) so that the certified logit bound
    beta max||q|| max||k|| of every layer on ``batch`` is at most ``max_logit_bound``.

    Scaling q and k by sqrt(c) scales every logit by c (also after rotary embeddings). Earlier
    layers change later layers' inputs, so it measures and rescales up to ``rounds`` times.
    With ``match=True`` layers below the bound are scaled up to it too (every layer ends at the
    bound). Returns the product of the factors c_l applied per layer. This changes the model: it
    is how lorakit builds the variants of its reproductions, not a training method.
    """
    if not max_logit_bound > 0:
        raise ValueError(f"max_logit_bound={max_logit_bound!r} must be > 0")
    applied: dict[str, float] = {}
    proj = projections(model, attention_modules(model))
    for _ in range(rounds):
        report = measure_norms(model, batch)
        worst = {row["layer"]: row["logit_bound"] for row in report.layers()}
        over = {name: g for name, g in worst.items()
                if g > max_logit_bound * (1 + 1e-4) or (match and g < max_logit_bound * (1 - 1e-3))}
        if not over:
            return applied
        for name, g in over.items():
            c = max_logit_bound / g
            found = proj.get(name, {})
            if "q" not in found or "k" not in found:
                raise ModelError(f"{name}: no query/key projections found to rescale")
            for mu in "qk":
                _scale_projection(*found[mu], math.sqrt(c))
            applied[name] = applied.get(name, 1.0) * c
    report = measure_norms(model, batch)
    left = [row["layer"] for row in report.layers() if row["logit_bound"] > max_logit_bound * (1 + 1e-4)
            or (match and row["logit_bound"] < max_logit_bound * (1 - 1e-2))]
    if left:
        raise ModelError(f"after {rounds} rounds {len(left)} layers still miss logit bound {max_logit_bound}: {left[:3]}")
    return applied


def _scale_projection(module: nn.Module, index: int, factor: float) -> None:
    """Scale one projection's output (a third of a fused q/k/v output when index >= 0)."""
    lora = module if isinstance(module, LoraLinear) else None
    base = lora.base_layer if lora is not None else module
    fan_in_fan_out = not isinstance(base, nn.Linear)  # GPT-2 Conv1D keeps [in, out]
    out_dim = 1 if fan_in_fan_out else 0

    def rows(t: Tensor, dim: int) -> Tensor:
        return t if index < 0 else t.narrow(dim, index * (t.shape[dim] // 3), t.shape[dim] // 3)

    rows(base.weight, out_dim).mul_(factor)
    if getattr(base, "bias", None) is not None:
        rows(base.bias, 0).mul_(factor)
    if lora is not None:
        for b in lora.lora_B.values():  # every adapter's rows scale with the base's
            rows(b.weight, 0).mul_(factor)
