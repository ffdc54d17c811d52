"""Adapter variants as strategy objects (lorakit.adapters.variants) and the frozen weight's storage
(lorakit.adapters.storage): each variant's numerics against its plain formula, the registry, and the rule that
no module outside the variants branches on a variant's name."""

import ast
import copy
import math
import re
from pathlib import Path

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import celora
from lorakit.adapters import variants
from lorakit.adapters.layer import LoraLinear
from lorakit.adapters.storage import DenseWeight
from lorakit.adapters.variants import Dora, Lora, Pissa
from lorakit.errors import ConfigError

SRC = Path(lorakit.__file__).parent
VARIANT_WORD = re.compile(r"dora|pissa|celora", re.IGNORECASE)
# Packages whose conditions may name a variant: the variants themselves, CE-LoRA's paper package, and the
# experiment and benchmark names of reproduce/ and bench/.
EXEMPT_PACKAGES = ("adapters/variants/", "celora/", "reproduce/", "bench/")


def layer(out_f=5, in_f=7, r=3, alpha=6.0, variant=None, conv=False, seed=0, bias=True):
    torch.manual_seed(seed)
    base = Conv1D(out_f, in_f) if conv else torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    return LoraLinear(base, r, alpha, variant=variant)


def randomise(lay, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lay.adapter_parameters(lay.active):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def plain(x, w0, bias, a, b, s):
    """y = x W0^T + b + s (x A^T) B^T."""
    y = x @ w0.T + s * (x @ a.T) @ b.T
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------- the rule
def _words(node):
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id
        elif isinstance(n, ast.Attribute):
            yield n.attr
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.value
        elif isinstance(n, ast.keyword) and n.arg:
            yield n.arg


def _conditions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, ast.BoolOp):
            yield from node.values


def _exempt(rel, condition):
    """cli's reproduce experiment names (``a.experiment == "celora"``) are names of experiments, not variants."""
    return rel == "cli.py" and isinstance(condition, ast.Compare) and any(
        isinstance(n, ast.Attribute) and n.attr == "experiment" for n in ast.walk(condition.left))


def variant_branches(root=SRC):
    """(path, line, condition) of every condition outside the exempt packages that names a variant."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(EXEMPT_PACKAGES):
            continue
        source = path.read_text()
        for condition in _conditions(ast.parse(source)):
            if any(VARIANT_WORD.search(w) for w in _words(condition)) and not _exempt(rel, condition):
                found.append((rel, condition.lineno, ast.get_source_segment(source, condition)))
    return found


def test_no_module_outside_the_variants_branches_on_a_variant():
    """A new variant is a new module plus a registry row: no if/while/conditional expression/comprehension filter
    outside adapters/variants/ (and the CE-LoRA paper package, reproduce/, bench/) names dora, pissa or celora."""
    assert variant_branches() == []


def test_the_layer_is_a_short_composition_naming_no_variant():
    """LoraLinear holds a storage and per-adapter variants: at most 180 lines, no variant named in its code
    (names, attributes, strings other than docstrings)."""
    source = (SRC / "adapters" / "layer.py").read_text()
    assert len(source.splitlines()) <= 180
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and ast.get_docstring(n) is not None}
    words = [n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else n.value
             for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.Attribute))
             or (isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings)]
    assert [w for w in words if VARIANT_WORD.search(w)] == []


def test_the_rule_sees_every_kind_of_condition(tmp_path):
    (tmp_path / "m.py").write_text(
        "if cfg.use_dora:\n    pass\n"
        "while x.init == 'pissa':\n    pass\n"
        "y = 1 if hasattr(layer, 'pissa_A0') else 2\n"
        "z = [a for a in s if a.config.backward == 'celora']\n"
        "ok = flag and use_dora\n"
        "fine = 1 if cfg.variant.rewrites_base else 2\n")
    (tmp_path / "cli.py").write_text("if a.experiment == 'celora':\n    pass\n")
    assert sorted(line for _, line, _ in variant_branches(tmp_path)) == [1, 3, 5, 6, 7]


# ---------------------------------------------------------------------------- storage
def test_dense_weight_keeps_the_layout_of_its_module():
    conv = Conv1D(5, 7)  # weight [in, out]
    dense = DenseWeight(conv)
    assert dense.transposed and dense.weight().shape == (5, 7) and dense.weight().data_ptr() == conv.weight.data_ptr()
    before = dense.weight().detach().clone()
    delta = torch.randn(5, 7, dtype=torch.float64)
    dense.add_(delta)
    torch.testing.assert_close(conv.weight.T, before + delta.float())
    dense.set_(before)
    torch.testing.assert_close(conv.weight.T, before, atol=0, rtol=0)
    assert dense.adapter_dtype == torch.float32 and DenseWeight(torch.nn.Linear(2, 2).double()).adapter_dtype == torch.float64


def test_the_layer_keeps_peft_keys():
    lay = layer(variant=Dora(Lora()))
    assert list(lay.state_dict()) == ["base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                                      "lora_B.default.weight", "lora_magnitude_vector.default"]
    pissa = layer(variant=Pissa())
    assert list(pissa.state_dict()) == ["base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                                        "lora_B.default.weight"]  # A0, B0 are kept outside the state_dict


# ---------------------------------------------------------------------------- plain LoRA
@pytest.mark.parametrize("conv", [False, True])
def test_lora_forward_merge_and_unmerge_equal_the_formula(conv):
    lay = layer(conv=conv)
    assert torch.count_nonzero(lay.B) == 0 and torch.count_nonzero(lay.A) > 0  # B = 0: starts as the base
    randomise(lay)
    w0 = lay.base_weight().detach().clone()
    x = torch.randn(4, 7)
    want = plain(x, w0, lay.bias, lay.A, lay.B, lay.scale)
    torch.testing.assert_close(lay(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lay.delta_weight(), lay.scale * lay.B @ lay.A)
    lay.merge()
    torch.testing.assert_close(lay.base_weight(), w0 + lay.scale * lay.B @ lay.A)
    torch.testing.assert_close(lay(x), want, atol=1e-5, rtol=1e-5)
    lay.unmerge()
    torch.testing.assert_close(lay.base_weight(), w0, atol=1e-6, rtol=1e-6)


def test_gaussian_init_and_peft_names():
    lay = layer(out_f=64, in_f=256, r=4, variant=Lora("gaussian"))
    assert abs(float(lay.A.detach().std()) - 1 / 4) < 0.02 and torch.count_nonzero(lay.B) == 0
    for init in ("kaiming", "gaussian", "pissa"):
        assert variants.init_from_peft(variants.peft_init(init)) == init
    assert variants.init_from_peft(False) == "kaiming" and variants.init_from_peft("pissa_niter_4") == "pissa"
    assert variants.init_from_peft("olora") is None
    with pytest.raises(ConfigError, match="init='olora' is not one of 'kaiming', 'gaussian'"):
        Lora("olora")


# ---------------------------------------------------------------------------- DoRA
def test_dora_forward_gradient_and_merge_equal_the_formula():
    lay = layer(variant=Dora(Lora()))
    w0 = lay.base_weight().detach().clone()
    torch.testing.assert_close(lay.magnitude.detach(), torch.linalg.vector_norm(w0, dim=1))  # m starts at the norms
    randomise(lay)
    x = torch.randn(4, 7)
    a, b, m, s = lay.A, lay.B, lay.magnitude, lay.scale
    norm = torch.linalg.vector_norm(w0 + s * b @ a, dim=1).detach()
    z = plain(x, w0, None, a, b, s)
    want = (m / norm) * z + lay.bias
    y = lay(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(m.grad, (grad * z / norm).sum(0).detach(), atol=1e-5, rtol=1e-5)  # dm, norm detached
    lay.merge()
    torch.testing.assert_close(lay.base_weight(), (m / norm)[:, None] * (w0 + s * b @ a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lay(x), want, atol=1e-5, rtol=1e-5)
    assert lay._buffers  # the g of the merge is kept until unmerge
    lay.unmerge()
    assert not lay._buffers
    torch.testing.assert_close(lay.base_weight(), w0, atol=1e-5, rtol=1e-5)
    assert "dora" in lay.extra_repr()


def test_dora_files_and_removal():
    lay = layer(variant=Dora(Lora()))
    assert set(lay.variant.file_tensors(lay, "default")) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert lay.variant.extra_shapes(7, 5) == {"lora_magnitude_vector": (5,)}
    lay.add_adapter("plain", 2, 4.0)
    lay.delete_adapter("default")
    assert not len(lay.lora_magnitude_vector) and lay.adapter_parameters("plain") == [lay.lora_A["plain"].weight,
                                                                                      lay.lora_B["plain"].weight]


# ---------------------------------------------------------------------------- PiSSA
def test_pissa_residual_conversion_and_restore():
    lay = layer(r=2, variant=Pissa())
    w0 = layer(r=2).base_weight().detach().clone()  # the same seed: the original weight
    s, a, b = lay.scale, lay.A.detach(), lay.B.detach()
    u, sv, vh = torch.linalg.svd(w0)
    torch.testing.assert_close(s * b @ a, (u[:, :2] * sv[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)  # the top-2 part
    torch.testing.assert_close(lay.base_weight() + s * b @ a, w0, atol=1e-5, rtol=1e-5)  # residual + s B A = W0
    randomise(lay)
    x = torch.randn(3, 7)
    files = lay.variant.file_tensors(lay, "default")
    a2, b2 = files["lora_A.weight"], files["lora_B.weight"]
    assert a2.shape == (4, 7) and b2.shape == (5, 4)
    torch.testing.assert_close(plain(x, w0, lay.bias, a2, b2, s), lay(x), atol=1e-5, rtol=1e-5)  # for W0, same scale
    unconverted = lay.variant.file_tensors(lay, "default", convert=False)
    assert unconverted["lora_A.weight"].shape == (2, 7)
    cfg = lorakit.LoraConfig(r=2, alpha=6, init="pissa", rank_pattern={"q": 3})
    saved = cfg.variant.saved_config(cfg, convert=True)
    assert (saved.r, saved.alpha, saved.rank_pattern, saved.init) == (4, 12, {"q": 6}, "kaiming")
    assert cfg.variant.saved_config(cfg, convert=False) is cfg
    lay.variant.restore_base(lay, "default")
    torch.testing.assert_close(lay.base_weight(), w0, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- CE-LoRA
def test_celora_plans_installs_and_uninstalls(make_model):
    cfg = lorakit.LoraConfig(r=4, targets="all-linear", backward="celora",
                             celora=lorakit.CeloraConfig(keep_ratio=0.5, svd_rank="balanced"))
    assert repr(cfg.variant) == "Celora(Lora('kaiming'))"
    model = lorakit.attach(make_model("llama"), cfg)
    ctl = celora.controller(model)
    assert ctl is not None and ctl.selectors
    for name, sel in ctl.selectors.items():
        lay = model.get_submodule(name)
        assert lay.frozen_input_grad is sel and lay.r == 3  # balanced: int(7 * 4 / 8)
    hooks = variants.step_hooks(model)
    assert len(hooks) == 1 and isinstance(hooks[0], celora.Refresher)
    lorakit.unload(model, merge=False)
    assert celora.controller(model) is None and variants.step_hooks(model) == []


# ---------------------------------------------------------------------------- the registry
def test_the_registry_picks_and_validates():
    assert repr(lorakit.LoraConfig().variant) == "Lora('kaiming')"
    assert repr(lorakit.LoraConfig(use_dora=True, init="gaussian").variant) == "Dora(Lora('gaussian'))"
    assert repr(lorakit.LoraConfig(use_dora=True, backward="celora").variant) == "Celora(Dora(Lora('kaiming')))"
    pissa = lorakit.LoraConfig(init="pissa", backward="celora").variant
    assert pissa.rewrites_base and "init='pissa'" in pissa.one_per_model  # the inner reason comes first
    dora = lorakit.LoraConfig(use_dora=True).variant
    assert (dora.active_alone, dora.file_kind, dora.flag) == ("a DoRA adapter", "a DoRA adapter", ", dora")
    assert dora.combine_refusal and not lorakit.LoraConfig().variant.combine_refusal
    with pytest.raises(ConfigError, match=re.escape("use_dora=True with init='pissa' is not supported")):
        lorakit.LoraConfig(use_dora=True, init="pissa")
    with pytest.raises(ConfigError, match="norm_cap with use_dora=True"):
        lorakit.LoraConfig(use_dora=True, norm_control=lorakit.NormControl(1.0))


def test_a_model_round_trips_through_the_variants(make_model, token_batch, tmp_path):
    """attach -> save -> load with DoRA, the same outputs (the layer asks the variant for its file tensors)."""
    base = make_model("llama")
    model = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj"], use_dora=True))
    for _, lay in lorakit.lora_layers(model):
        randomise(lay)
    ids, mask = token_batch()
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    out = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, out, atol=1e-6, rtol=0)
    summary = lorakit.summary(model)
    assert summary.adapter_params == sum(2 * (lay.in_features + lay.out_features) + lay.out_features  # A, B, m
                                         for _, lay in lorakit.lora_layers(model))
    assert math.isclose(summary.rows[0][5], 16 / 2)
