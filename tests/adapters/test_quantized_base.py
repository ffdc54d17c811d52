"""lorakit.quantize: int8 / NF4 / int4 frozen bases under LoRA layers. The fused forward and the adapter gradients
equal those on the dequantised weights; tiny Llamas train with adapters only; adapter files stay PEFT's; merge into
a quantised base and bad formats are refused with the fix."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.adapters.layer import LoraLinear
from lorakit.adapters.quantize import make_format
from lorakit.adapters.storage import DenseWeight, QuantizedLinear, QuantizedWeight, storage_for
from lorakit.errors import ConfigError

FORMATS = [dict(bits=8), dict(bits=8, scale_dtype=torch.bfloat16), dict(bits=4, format="nf4"),
           dict(bits=4, format="nf4", double_quant=True), dict(bits=4, format="int4", group_size=32)]
IDS = ["int8", "int8-bf16-scales", "nf4", "nf4-double-quant", "int4-g32"]


def llama(seed=0):
    """A tiny config-built Llama whose widths (64, 128) every block and group size divides."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(cfg).eval()


def quantized_layer(options, bias=True, seed=0):
    """(an adapted layer on a quantised base, the same adapters on an nn.Linear holding the dequantised weights)."""
    torch.manual_seed(seed)
    base = nn.Linear(64, 48, bias=bias)
    layer = LoraLinear(base, r=4, alpha=8)
    nn.init.normal_(layer.B, std=0.1)  # B = 0 at init would hide dX's adapter share and dA
    model = nn.Sequential(layer)
    lorakit.quantize(model, **options)
    assert isinstance(layer.storage, QuantizedWeight)
    ref_base = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        ref_base.weight.copy_(layer.storage.weight(torch.float32))
        if bias:
            ref_base.bias.copy_(layer.bias)
    ref = LoraLinear(ref_base, r=4, alpha=8)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if "lora_" in k}, strict=False)
    for m in (layer, ref):
        m.base_layer.requires_grad_(False)
    return layer, ref


@pytest.mark.parametrize("options", FORMATS, ids=IDS)
def test_forward_and_adapter_gradients_equal_the_dequantised_reference(options):
    layer, ref = quantized_layer(options)
    x = torch.randn(3, 7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for got, want in [(x.grad, x_ref.grad), (layer.A.grad, ref.A.grad), (layer.B.grad, ref.B.grad)]:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert layer.A.grad.abs().max() > 0 and layer.B.grad.abs().max() > 0


def test_the_backward_keeps_no_float_copy_of_the_quantised_weight():
    """Between forward and backward the graph holds the packed weight only (dX dequantises again), whereas a dense
    base's kernel keeps W0 [out, in] for G W0."""
    saved = []
    for options in (FORMATS[0], None):
        layer, ref = quantized_layer(FORMATS[0])
        module = layer if options else ref
        x = torch.randn(5, 64, requires_grad=True)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            module(x).sum().backward()
        saved.append((48, 64) in shapes)
    assert saved == [False, True]


def test_plain_quantized_linear_forward_and_dx_equal_the_dequantised_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantizedLinear.from_module(lin, make_format(4, "nf4"))
    w = q.weight
    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), torch.nn.functional.linear(x_ref, w, lin.bias.detach())
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_dora_output_scale_path_on_a_quantised_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    lorakit.quantize(model, bits=4)
    lorakit.attach(model, lorakit.LoraConfig(r=4, use_dora=True, targets=["0"]), fast=False)
    layer = model[0]
    ref = nn.Sequential(nn.Linear(64, 48))
    with torch.no_grad():
        ref[0].weight.copy_(layer.storage.weight(torch.float32))
        ref[0].bias.copy_(layer.bias)
    lorakit.attach(ref, lorakit.LoraConfig(r=4, use_dora=True, targets=["0"]), fast=False)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(6, 64)
    assert torch.allclose(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_storage_reports_and_refuses_changes():
    layer, _ = quantized_layer(dict(bits=8))
    s = layer.storage
    assert s.dtype == torch.float32 and s.adapter_dtype == torch.float32 and s.device.type == "cpu"
    assert s.nbytes == 48 * 64 + 48 * 4  # int8 codes and fp32 scales
    assert s.weight().shape == (48, 64) and torch.equal(layer.base_weight(), s.weight())
    assert not [n for n, _ in layer.base_layer.named_parameters() if n == "weight"]  # no float weight held
    for change in (lambda: s.add_(torch.zeros(48, 64)), lambda: s.set_(torch.zeros(48, 64))):
        with pytest.raises(ConfigError, match="--base-dtype bf16"):
            change()
    assert isinstance(storage_for(nn.Linear(4, 4)), DenseWeight)


@pytest.mark.parametrize("options", FORMATS, ids=IDS)
def test_tiny_llama_quantised_attached_trains_adapters_only(options):
    model = llama()
    lorakit.quantize(model, **options)
    lorakit.attach(model, r=4, targets="all-linear")
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14 and "lm_head" not in quantized  # 7 projections x 2 layers; the head stays float
    assert isinstance(model.lm_head.weight, nn.Parameter)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not [n for n, _ in model.named_parameters() if "proj.base_layer.weight" in n]
    packed_before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 97, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert model.model.layers[0].self_attn.q_proj.B.abs().max() > 0  # the adapters moved
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in packed_before.items())  # the packed base did not


def test_quantize_before_or_after_attach_gives_the_same_model():
    a, b = llama(), llama()
    lorakit.quantize(a, bits=4, format="int4")
    lorakit.attach(a, r=4, targets="all-linear")
    lorakit.attach(b, r=4, targets="all-linear")
    lorakit.quantize(b, bits=4, format="int4")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)


def test_quantize_head_and_packed_state_dict_round_trip():
    model = llama()
    lorakit.quantize(model, bits=8, quantize_head=True)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding) and isinstance(model.model.embed_tokens.weight, nn.Parameter)
    keys = [k for k in model.state_dict() if k.startswith("model.layers.0.self_attn.q_proj.")]
    assert sorted(keys) == ["model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.scale"]
    other = llama(seed=1)
    lorakit.quantize(other, bits=8, quantize_head=True)
    other.load_state_dict(model.state_dict())
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, other(input_ids=ids).logits)


def test_adapter_files_are_plain_peft_and_load_on_the_float_base(tmp_path):
    float_model, model = llama(), llama()
    lorakit.quantize(model, bits=4)
    lorakit.attach(model, r=4, targets="attn-qv")
    for _, layer in lorakit.lora_layers(model):
        nn.init.normal_(layer.B, std=0.05)
    lorakit.save_adapter(model, tmp_path / "q")
    lorakit.attach(float_model, r=4, targets="attn-qv")
    lorakit.save_adapter(float_model, tmp_path / "f")
    saved = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(load_file(tmp_path / "f" / "adapter_model.safetensors"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)
    fresh = llama()
    lorakit.load_adapter(fresh, tmp_path / "q")
    assert torch.equal(fresh.model.layers[1].self_attn.v_proj.B, model.model.layers[1].self_attn.v_proj.B)


def test_merge_into_a_quantised_base_is_refused():
    model = llama()
    lorakit.attach(model, r=4, targets="attn-qv")
    lorakit.quantize(model, bits=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"quantised \(int8\).*--base-dtype bf16"):
        lorakit.merge(model)
    with pytest.raises(ConfigError, match="--base-dtype bf16"):
        lorakit.unload(model, merge=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_options_and_shapes_are_refused_before_any_change(make_model):
    model = make_model("llama")  # intermediate_size 48: no block of 32/64/128 divides down_proj's input
    with pytest.raises(ConfigError, match=r"q_proj has in_features=32, not a multiple of the nf4 block size 64; "
                                          r"use group_size=32 \(it divides 32\)"):
        lorakit.quantize(model, bits=4)
    with pytest.raises(ConfigError, match=r"down_proj has in_features=48, not a multiple of the nf4 block size 32; "
                                          r"no block size .* use bits=8"):
        lorakit.quantize(model, bits=4, group_size=32)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    lorakit.quantize(model, bits=8)  # int8 has no blocks
    for options, message in [(dict(bits=3), r"bits=3 is not supported; use bits=8"),
                             (dict(bits=4, format="int8"), r"format='int8' with bits=4 .* use one of"),
                             (dict(bits=4, format="fp4"), r"format='fp4'"),
                             (dict(bits=4, format="int4", group_size=16), r"group_size=16 is not one of \(32, 64, 128\)"),
                             (dict(bits=8, double_quant=True), r"double_quant=True applies to format='nf4' only")]:
        with pytest.raises(ConfigError, match=message):
            lorakit.quantize(llama(), **options)


def test_a_merged_layer_is_refused_and_copy_keeps_packed_buffers():
    model = llama()
    lorakit.attach(model, r=4, targets="attn-qv")
    lorakit.merge(model)
    with pytest.raises(ConfigError, match="unmerge"):
        lorakit.quantize(model, bits=8)
    lorakit.unmerge(model)
    lorakit.quantize(model, bits=8)
    clone = copy.deepcopy(model)
    assert isinstance(clone.model.layers[0].self_attn.q_proj.storage, QuantizedWeight)
    assert clone.model.layers[0].self_attn.q_proj.storage.module is clone.model.layers[0].self_attn.q_proj.base_layer


def test_quantize_head_of_a_tied_model_is_refused_before_any_change():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ConfigError, match=r"lm_head is tied to the input embedding.*drop --quantize-head"):
        lorakit.quantize(model, bits=4, quantize_head=True)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    lorakit.quantize(model, bits=4)  # without the head: the tie stays as it was
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_packed_head_in_the_fused_loss_is_read_a_block_of_rows_at_a_time(monkeypatch):
    """--quantize-head: the fused loss dequantises the head in blocks of rows (never whole), with the same loss and
    adapter gradients as the unfused head on the same packed weights."""
    from lorakit.kernels import linear_cross_entropy as lce

    ids = torch.randint(3, 97, (2, 12))
    grads, losses = [], []
    for fast in (True, False):
        model = llama()
        lorakit.quantize(model, bits=4, format="int4", group_size=32, quantize_head=True)
        lorakit.attach(model, lorakit.LoraConfig(r=4, targets="all-linear"), fast=fast)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.B.normal_(0, 0.1)
        model.train()
        head, reads = model.lm_head, []
        whole = head.dequantize
        monkeypatch.setattr(head, "dequantize", lambda dtype=None, rows=None, out=None: reads.append(rows) or
                            whole(dtype, rows, out))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if fast:  # the fused loss (no logits formed), reading only blocks of rows (logits; the same pass forms dX)
            assert out.logits is None
            assert reads and all(r is not None and r.stop - r.start <= lce.WIDEN_ELEMENTS // 64 for r in reads)
        else:
            assert out.logits is not None
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name


def test_packed_rows_come_in_blocks_equal_to_the_dequantised_weight(monkeypatch):
    from lorakit.kernels import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "WIDEN_ELEMENTS", 256 * 64)
    layer = QuantizedLinear.from_module(nn.Linear(64, 600, bias=False), make_format(4, "nf4", 64))
    blocks = [(v0, w.clone()) for v0, w in lce._vocab_blocks(layer.packed_rows(), torch.float32)]
    assert [(v0, w.shape[0]) for v0, w in blocks] == [(0, 256), (256, 256), (512, 88)]
    assert torch.equal(torch.cat([w for _, w in blocks]), layer.dequantize(torch.float32))
