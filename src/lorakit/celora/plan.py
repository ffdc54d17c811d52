"""Which adapted layers CE-LoRA approximates, with which keep ratio and Double-LoRA rank.

Released configuration (LLaMA naming): v_proj 0.55, o_proj 0.55, up_proj 0.65,
down_proj 0.65; q_proj, k_proj and gate_proj stay exact (sparsifying them raised loss and
instability in the authors' ablations). The registry (lorakit.architectures, each family's
keep_ratio) carries the same choice over to other architectures' names.

keep_ratio semantics:
  None           the preset of the architecture
  a float        every adapted layer except the query/key/gate projections
  a mapping      {module name or dotted suffix: ratio}; a layer takes the value of the
                 longest key it ends with; every key must match an adapted layer
svd_rank: r0 of the frozen Double-LoRA factors: None (= the layer's adapter rank r),
an int (0 = no Double-LoRA, plain column-row selection), or "balanced" (trainable rank
and r0 both int(7 r / 8), so memory stays that of plain LoRA, as released).
"""

from __future__ import annotations

from lorakit.architectures import EXACT_LEAVES, families_with
from lorakit.celora.selector import SelectorSpec
from lorakit.errors import ConfigError

KEEP_PRESETS: dict[str, dict[str, float]] = families_with("keep_ratio")  # model_type -> preset, from the registry


def check_keep_ratio(where: str, value) -> float:
    """A keep ratio in (0, 1]; CeloraConfig checks every one it is given (plan_layers trusts them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{where}={value!r} must be in (0, 1]: the fraction of output features kept in the backward")
    return float(value)


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def balanced_rank(r: int) -> int:
    return max(1, (7 * r) // 8)


def keep_ratios(model_type: str | None, layer_names: list[str], keep_ratio) -> dict[str, float]:
    """{layer name: keep ratio} for the approximated layers (see the module docstring)."""
    if isinstance(keep_ratio, dict):
        mapping = {k: float(v) for k, v in keep_ratio.items()}
    elif keep_ratio is None:
        if model_type not in KEEP_PRESETS:
            raise ConfigError(
                f"no CE-LoRA keep-ratio preset for model_type {model_type!r}; pass keep_ratio=0.6 (all but query/key/gate) "
                "or a mapping such as {'v_proj': 0.55, 'down_proj': 0.65}"
            )
        mapping = KEEP_PRESETS[model_type]
    else:
        ratio = float(keep_ratio)
        return {n: ratio for n in layer_names if n.rsplit(".", 1)[-1] not in EXACT_LEAVES}
    if isinstance(keep_ratio, dict):
        leaves = sorted({n.rsplit(".", 1)[-1] for n in layer_names})
        for key in mapping:
            if not any(_matches(n, key) for n in layer_names):
                raise ConfigError(f"keep_ratio key {key!r} matches no adapted module; adapted modules are named {leaves}")
    plan = {}
    for name in layer_names:
        hits = [k for k in mapping if _matches(name, k)]
        if hits:
            plan[name] = mapping[max(hits, key=len)]
    return plan


def plan_layers(model_type: str | None, shapes: dict[str, tuple[int, int, int]], *, keep_ratio, svd_rank,
                selection: str) -> dict[str, SelectorSpec]:
    """{layer: SelectorSpec} from {layer: (in, out, adapter rank r)}; validates every value.

    With svd_rank="balanced" the spec's r0 is int(7 r / 8) and the caller lowers the
    trainable rank of these layers to the same value.
    """
    plan = keep_ratios(model_type, list(shapes), keep_ratio)
    if not plan:
        raise ConfigError(f"backward='celora' approximates none of the adapted layers {sorted(shapes)[:6]}...; "
                          "adapt more layers (e.g. targets='all-linear') or give keep_ratio for these names")
    specs = {}
    for i, (name, ratio) in enumerate(sorted(plan.items())):
        in_f, out_f, r = shapes[name]
        if svd_rank == "balanced":
            r0 = balanced_rank(r)
        elif svd_rank is None:
            r0 = r
        else:
            r0 = int(svd_rank)
        if r0 >= min(in_f, out_f):
            raise ConfigError(f"svd_rank={r0} for {name} must be below min(in, out) = {min(in_f, out_f)} "
                              f"(the layer is {in_f} -> {out_f}); lower svd_rank")
        specs[name] = SelectorSpec(keep_ratio=ratio, svd_rank=r0, selection=selection, seed=i)
    return specs
