"""lorakit export: llama.cpp LoRA files and merged GGUF models, read back with gguf-py's reader and checked against
lorakit's own merge by an independent reader (numpy over the file's tensors, applying llama.cpp's documented
semantics: W + (alpha / r) B A per pair, q/k rows un-permuted), and against transformers' GGUF loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, refused, write_gguf
from lorakit import LoraConfig, attach, save_adapter, unload
from lorakit.export import export_gguf
from lorakit.train.models import load_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCH_ENUM = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3": "GEMMA3"}


# ---------------------------------------------------------------------- an independent reader
def read(path):
    """({key: value}, {tensor name: float32 array in numpy (rows, cols) order}, {tensor name: ggml type name})."""
    import gguf

    reader = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors, types = {}, {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(values, np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])
        types[t.name] = t.tensor_type.name
    return keys, tensors, types


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's stored q/k row order back to Hugging Face's (the inverse of convert_hf_to_gguf's permute)."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def hf_names(arch: str, layers: int):
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCH_ENUM[arch]), layers)


def apply_lora_file(base: dict, lora_keys: dict, lora: dict, heads: dict) -> dict:
    """llama.cpp's reading of a LoRA file: W + (alpha / r) B A for every pair, r = B's columns; then the q/k rows
    un-permuted (``heads``: {tensor name: heads of its rows} for the permuted ones)."""
    alpha = float(lora_keys["adapter.lora.alpha"])
    out = dict(base)
    for name in {n.rsplit(".", 1)[0] for n in lora}:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        out[name] = base[name] + alpha / b.shape[1] * (b @ a)
    return {n: unpermute(v, heads[n]) if n in heads else v for n, v in out.items()}


# ---------------------------------------------------------------------- fixtures
def adapted(base, tmp_path, *, seed=0, **lora):
    """A lorakit adapter (B random, so that it changes the model) on ``base`` saved in tmp_path/adapter; returns
    (its directory, the adapted model)."""
    loaded = load_model(str(base), "causal-lm", dtype=torch.float32)
    lora.setdefault("targets", ALL)
    model = attach(loaded.model, LoraConfig(task_type="CAUSAL_LM", base_model=str(base), **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return save_adapter(model, tmp_path / "adapter"), model


def lorakit_merged(model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in unload(model, merge=True).state_dict().items()}


@pytest.fixture
def gguf_base(tmp_path, cache):
    def make(arch="llama", tied=False):
        path = tmp_path / f"{arch}-base.gguf"
        write_gguf(path, arch, layers=2, hidden=64, heads=4, kv_heads=2, ff=96, tied=tied)
        return path
    return make


# ---------------------------------------------------------------------- the LoRA file
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_lora_file_names_shapes_and_merge_match_llama_cpp_semantics(tmp_path, gguf_base, arch):
    base = gguf_base(arch)
    adapter, model = adapted(base, tmp_path, r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0},
                             rslora=(arch == "qwen2"))
    lora_keys, lora, types = read(export_gguf(adapter, tmp_path / "lora.gguf")["gguf"])
    base_keys, base_tensors, _ = read(base)

    assert lora_keys["general.type"] == "adapter" and lora_keys["adapter.type"] == "lora"
    assert lora_keys["general.architecture"] == arch and lora_keys["adapter.lora.alpha"] == pytest.approx(8.0)
    pairs = {n.rsplit(".", 1)[0] for n in lora}
    assert {n + s for n in pairs for s in (".lora_a", ".lora_b")} == set(lora)
    assert pairs <= set(base_tensors)  # one to one with the base file's names
    assert pairs == {f"blk.{i}.{t}.weight" for i in range(2) for t in
                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    for n in pairs:  # A is r x in, B out x r (gguf shapes [in, r] and [r, out]), fp32
        out_f, in_f = base_tensors[n].shape
        r = 2 if "attn_v" in n else 4
        assert lora[n + ".lora_a"].shape == (r, in_f) and lora[n + ".lora_b"].shape == (out_f, r)
        assert types[n + ".lora_a"] == types[n + ".lora_b"] == "F32"

    # The independent reader, applying llama.cpp's semantics, changes each weight as lorakit's merge does.
    heads = {f"blk.{i}.attn_{t}.weight": h for i in range(2) for t, h in (("q", 4), ("k", 2))} if arch == "llama" else {}
    applied = apply_lora_file(base_tensors, lora_keys, lora, heads)
    base_hf = {n: unpermute(v, heads[n]) if n in heads else v for n, v in base_tensors.items()}
    merged = lorakit_merged(model)
    loaded = load_model(str(base), "causal-lm", dtype=torch.float32).model.state_dict()  # lorakit's base (bf16 cache)
    names = hf_names(arch, 2)
    for hf, w in merged.items():
        n = names.get_name(hf, try_suffixes=(".weight",))
        if n not in pairs:
            continue
        delta_lorakit = w - loaded[hf].float().numpy()
        np.testing.assert_allclose(applied[n] - base_hf[n], delta_lorakit, rtol=1e-5, atol=1e-6)
        assert np.abs(delta_lorakit).max() > 1e-3  # the adapter does change it


def test_merged_gguf_from_a_gguf_base_is_the_base_plus_the_lora_file(tmp_path, gguf_base):
    base = gguf_base("llama")
    adapter, _ = adapted(base, tmp_path, r=4, alpha=8)
    lora_keys, lora, _ = read(export_gguf(adapter, tmp_path / "lora.gguf")["gguf"])
    keys, merged, types = read(export_gguf(adapter, tmp_path / "m.gguf", format="gguf", outtype="f32")["gguf"])
    base_keys, base_tensors, _ = read(base)

    # llama.cpp's names and order, the base's metadata (tokenizer included) carried over, the file type set
    assert list(merged) == list(base_tensors)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.block_count", "llama.attention.head_count_kv"):
        assert keys[key] == base_keys[key]
    assert keys["general.file_type"] == 0 and set(types.values()) == {"F32"}
    applied = apply_lora_file(base_tensors, lora_keys, lora, {})  # both in the file's row order
    for name, values in merged.items():
        np.testing.assert_allclose(values, applied[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("outtype,tolerance", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 1e-2), ("q4_0", 0.1)])
def test_outtypes_encode_as_asked_within_their_rounding(tmp_path, gguf_base, outtype, tolerance):
    base = gguf_base("llama")
    adapter, _ = adapted(base, tmp_path, r=4, alpha=8)
    _, exact, _ = read(export_gguf(adapter, tmp_path / "f32.gguf", format="gguf", outtype="f32")["gguf"])
    keys, coded, types = read(export_gguf(adapter, tmp_path / f"{outtype}.gguf", format="gguf", outtype=outtype)["gguf"])
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[outtype]
    for name, values in coded.items():
        if values.ndim == 1:
            assert types[name] == "F32"  # norms stay f32, as llama.cpp's converter writes them
        elif outtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
            assert types[name] == "Q8_0"
        else:
            assert types[name] == want, name
        scale = np.abs(exact[name]).max()
        assert np.abs(values - exact[name]).max() <= tolerance * scale, name
    assert keys["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[outtype]


def test_an_adapted_tied_head_is_refused_in_a_lora_file_and_becomes_its_own_output_when_merged(tmp_path, gguf_base,
                                                                                                 capsys):
    base = gguf_base("llama", tied=True)
    adapter, model = adapted(base, tmp_path, r=4, alpha=8, targets=["q_proj", "lm_head"])
    refused(capsys, "export", adapter, "--out", tmp_path / "lora.gguf", needle="holds no output.weight")
    assert not (tmp_path / "lora.gguf").exists()
    _, merged, _ = read(export_gguf(adapter, tmp_path / "m.gguf", format="gguf", outtype="f32")["gguf"])
    _, base_tensors, _ = read(base)
    assert "output.weight" not in base_tensors and "output.weight" in merged
    np.testing.assert_array_equal(merged["token_embd.weight"], base_tensors["token_embd.weight"])
    head = model.lm_head
    delta = (head.settings["default"].scale * head.lora_B["default"].weight @ head.lora_A["default"].weight).detach()
    np.testing.assert_allclose(merged["output.weight"] - base_tensors["token_embd.weight"], delta.numpy(), atol=1e-6)


# ---------------------------------------------------------------------- from a Hugging Face model directory
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3"])
def test_merged_gguf_from_a_model_directory_loads_in_transformers_with_the_merged_logits(tmp_path, cache, arch,
                                                                                        smollm2_tokenizer, monkeypatch):
    """The tensors (names, q/k rows, Gemma's norm offset, Qwen's biases) read back by transformers' own GGUF loader
    give the merged model's logits."""
    import transformers as tf

    from lorakit.export import hf_metadata

    if arch == "qwen2":  # transformers reads SmolLM2's tokenizer beside a Qwen2 config with Qwen's splitting rules,
        # a pairing llama.cpp has no pre-tokenizer for (refused, tests/export/test_hf_metadata.py): call it qwen2 here
        class Any(dict):
            def __contains__(self, key):
                return True

            def __getitem__(self, key):
                return "qwen2"

        monkeypatch.setattr(hf_metadata, "PRE_TOKENIZERS", Any())
    if arch == "gemma3":  # Gemma's SentencePiece vocabulary needs a tokenizer.model: write SmolLM2's BPE one instead
        bpe = hf_metadata._tokenizer
        monkeypatch.setattr(hf_metadata, "_tokenizer", lambda model_dir, arch, hparams: bpe(model_dir, "llama", hparams))
    tok = smollm2_tokenizer
    config = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
              "gemma3": tf.Gemma3TextConfig}[arch](
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        **({"query_pre_attn_scalar": 16} if arch == "gemma3" else {}))  # llama.cpp's Gemma 3 scales by 1/sqrt(head_dim)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.1)  # Gemma's (1 + w): a zero norm weight would hide a missing offset
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    adapter, adapted_model = adapted(base, tmp_path, r=4, alpha=8)
    out = export_gguf(adapter, tmp_path / "m.gguf", format="gguf", outtype="f32")["gguf"]
    if arch == "mistral":  # llama.cpp runs Mistral as its llama (the converter's MistralModel is a LlamaModel)
        assert read(out)[0]["general.architecture"] == "llama"

    # transformers' GGUF reader does not read Gemma's query_pre_attn_scalar (llama.cpp derives it): given here
    read_back = tf.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32,
                                                        **({"query_pre_attn_scalar": 16} if arch == "gemma3" else {}))
    merged = unload(adapted_model, merge=True).eval()
    assert_reads_back_as(read_back, merged.state_dict(), merged)


def assert_reads_back_as(read_back, want: dict, merged) -> None:
    """The file read back by transformers holds ``want`` (to 1e-6) and computes ``merged``'s logits."""
    got = read_back.state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    ids = torch.tensor([[1, 5, 9, 30, 2, 17, 33, 4]])
    with torch.no_grad():
        torch.testing.assert_close(read_back.eval()(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- what cannot be exported, and the outputs
def test_dora_classifier_and_modules_to_save_are_refused_with_the_alternative(tmp_path, gguf_base, capsys,
                                                                            tiny_bert_dir):
    base = gguf_base("llama")
    dora, _ = adapted(base, tmp_path / "d", r=4, alpha=8, use_dora=True)
    refused(capsys, "export", dora, "--out", tmp_path / "x.gguf", needle="--format gguf")
    whole, _ = adapted(base, tmp_path / "w", r=4, alpha=8, modules_to_save=["lm_head"])
    refused(capsys, "export", whole, "--out", tmp_path / "x.gguf", needle="modules trained whole")

    bert = load_model(tiny_bert_dir, "classify", label_names=["neg", "pos"])
    attach(bert.model, LoraConfig(task_type="SEQ_CLS", base_model=str(tiny_bert_dir), targets="attn-qv"))
    save_adapter(bert.model, tmp_path / "cls", labels=["neg", "pos"])
    refused(capsys, "export", tmp_path / "cls", "--out", tmp_path / "x.gguf", "--format", "gguf", needle="lorakit merge")
    assert not (tmp_path / "x.gguf").exists()
    # a DoRA adapter merges
    code, out, err = cli(capsys, "export", dora, "--out", tmp_path / "x.gguf", "--format", "gguf")
    assert code == 0 and (tmp_path / "x.gguf").exists(), err


def test_outputs_are_never_overwritten_unasked_and_never_left_partial(tmp_path, gguf_base, capsys, monkeypatch):
    base = gguf_base("llama")
    adapter, _ = adapted(base, tmp_path, r=4, alpha=8)
    target = tmp_path / "out.gguf"
    target.write_bytes(b"mine")
    refused(capsys, "export", adapter, "--out", target, needle="--overwrite")
    assert target.read_bytes() == b"mine"
    refused(capsys, "export", adapter, "--out", tmp_path, needle="is a directory")
    refused(capsys, "export", adapter, "--out", tmp_path / "a.bin", needle="does not end in .gguf")
    refused(capsys, "export", adapter, needle="--out is required")
    refused(capsys, "export", adapter, "--out", base, "--model", base, "--overwrite", needle="is the base model")
    assert read(base)[1]  # the base is untouched

    from lorakit.export import writer

    calls = []

    def failing(values, qtype):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(values, qtype)

    real = writer.encode
    monkeypatch.setattr(writer, "encode", failing)
    monkeypatch.setattr("lorakit.export.merged.encode", failing)
    refused(capsys, "export", adapter, "--out", target, "--format", "gguf", "--overwrite", needle="No space left")
    assert target.read_bytes() == b"mine"  # what was there is untouched, and no temporary file is left
    assert sorted(os.listdir(tmp_path)) == sorted(["out.gguf", "adapter", "llama-base.gguf", "cache"])


def test_ollama_modelfile_for_the_adapter_and_for_the_merged_model(tmp_path, gguf_base, capsys):
    base = gguf_base("llama")
    adapter, _ = adapted(base, tmp_path, r=4, alpha=8)
    code, out, err = cli(capsys, "export", adapter, "--out", tmp_path / "ad.gguf", "--ollama")
    assert code == 0, err
    text = (tmp_path / "ad.Modelfile").read_text()
    assert f"FROM {base.resolve()}\nADAPTER ./ad.gguf\n" in text
    assert "ollama create ad -f" in out
    refused(capsys, "export", adapter, "--out", tmp_path / "ad.gguf", "--ollama", needle="--overwrite")

    (adapter / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                                 "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    code, out, err = cli(capsys, "export", adapter, "--out", tmp_path / "m.gguf", "--format", "gguf", "--ollama")
    assert code == 0, err
    text = (tmp_path / "m.Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\nTEMPLATE \"\"\"") and 'PARAMETER stop "<|im_end|>"' in text
    keys, _, _ = read(tmp_path / "m.gguf")
    assert keys["tokenizer.chat_template"] == (adapter / "chat_template.jinja").read_text()  # the adapter's template


def test_library_exports_a_model_with_an_adapter_attached(tmp_path, gguf_base):
    base = gguf_base("qwen2")
    adapter, model = adapted(base, tmp_path, r=4, alpha=8)
    from_dir = read(export_gguf(adapter, tmp_path / "a.gguf")["gguf"])[1]
    from_model = read(export_gguf(model, tmp_path / "b.gguf", model=str(base))["gguf"])[1]
    assert from_dir.keys() == from_model.keys()
    for name in from_dir:
        np.testing.assert_array_equal(from_dir[name], from_model[name])


def test_llama3_rope_scaling_goes_into_the_merged_file_as_llama_cpps_tensor(tmp_path, cache, smollm2_tokenizer):
    import transformers as tf

    from lorakit.export.hf_metadata import rope_freqs

    tok = smollm2_tokenizer
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 50000.0}
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                            rope_scaling=rope, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = tmp_path / "base"
    tf.LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    adapter, _ = adapted(base, tmp_path, r=4, alpha=8)
    keys, tensors, types = read(export_gguf(adapter, tmp_path / "m.gguf", format="gguf", outtype="q8_0")["gguf"])
    assert types["rope_freqs.weight"] == "F32"
    np.testing.assert_array_equal(tensors["rope_freqs.weight"], rope_freqs(base))
    assert tensors["rope_freqs.weight"].max() == 8.0


# ---------------------------------------------------------------------- Phi-3 (fused projections) and Gemma 1
def tiny_base(tmp_path, tok, config, monkeypatch) -> Path:
    """``config``'s model saved with SmolLM2's tokenizer (random norm weights: a missing offset would show); the
    export writes SmolLM2's byte-level BPE vocabulary (these families' own is SentencePiece, which needs a
    tokenizer.model: tests/export/test_hf_metadata.py)."""
    import transformers as tf

    from lorakit.export import hf_metadata

    bpe = hf_metadata._tokenizer
    monkeypatch.setattr(hf_metadata, "_tokenizer", lambda model_dir, arch, hparams: bpe(model_dir, "llama", hparams))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    return base


PHI3_ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("targets", [PHI3_ALL, ["o_proj", "down_proj"]], ids=["fused", "unfused"])
def test_phi3_merged_from_a_model_directory_loads_in_transformers_with_the_merged_logits(tmp_path, cache, targets,
                                                                                        smollm2_tokenizer,
                                                                                        monkeypatch):
    """Phi-3's fused qkv_proj and gate_up_proj (lorakit adapts them whole) are llama.cpp's attn_qkv and ffn_up as
    they are (gate rows, then up rows: ggml_swiglu's halves); read back by transformers' GGUF loader and by numpy."""
    import transformers as tf

    tok = smollm2_tokenizer
    config = tf.Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           original_max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = tiny_base(tmp_path, tok, config, monkeypatch)
    adapter, adapted_model = adapted(base, tmp_path, r=4, alpha=8, targets=targets)
    out = export_gguf(adapter, tmp_path / "m.gguf", format="gguf", outtype="f32")["gguf"]
    keys, tensors, types = read(out)
    merged = unload(adapted_model, merge=True).eval()
    want = merged.state_dict()

    assert keys["general.architecture"] == "phi3" and set(types.values()) == {"F32"}
    assert {k.removeprefix("phi3."): v for k, v in keys.items() if k.startswith("phi3.")} == {
        "context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 96,
        "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        "vocab_size": len(tok), "rope.dimension_count": 16, "rope.freq_base": 10000.0,
        "rope.scaling.original_context_length": 256, "attention.sliding_window": 0}
    assert sorted(tensors) == sorted(["token_embd.weight", "output_norm.weight", "output.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up",
                                                          "ffn_down")])
    for i in range(2):  # the fused tensors as llama.cpp's phi3 loads them: {hidden, hidden + 2 kv} and {hidden, 2 ff}
        layer = f"model.layers.{i}"
        assert tensors[f"blk.{i}.attn_qkv.weight"].shape == (64 + 2 * 2 * 16, 64)
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_qkv.weight"], want[f"{layer}.self_attn.qkv_proj.weight"])
        gate, up = np.split(tensors[f"blk.{i}.ffn_up.weight"], 2)  # ggml_swiglu: silu(first half) * second half
        w = want[f"{layer}.mlp.gate_up_proj.weight"].numpy()
        np.testing.assert_array_equal(gate, w[:96])
        np.testing.assert_array_equal(up, w[96:])
    from safetensors.torch import load_file

    before = load_file(base / "model.safetensors")
    for leaf in ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj"):  # the adapter changes what it targets
        name = f"model.layers.0.{leaf}.weight"
        changed = (want[name] - before[name].float()).abs().max() > 1e-3
        assert changed == (leaf.split(".")[1] in targets), name

    read_back = tf.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    assert type(read_back).__name__ == "Phi3ForCausalLM"
    assert_reads_back_as(read_back, want, merged)


def test_phi3_longrope_is_llama_cpps_factor_tensors_and_attention_factor(tmp_path, cache, smollm2_tokenizer,
                                                                        monkeypatch):
    import json

    import transformers as tf

    tok = smollm2_tokenizer
    long, short = [1.0 + i / 4 for i in range(8)], [1.0 + i / 16 for i in range(8)]
    config = tf.Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=1024, original_max_position_embeddings=256,
                           bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, sliding_window=512,
                           rope_parameters={"rope_type": "longrope", "long_factor": long, "short_factor": short,
                                            "original_max_position_embeddings": 256, "rope_theta": 10000.0})
    base = tiny_base(tmp_path, tok, config, monkeypatch)
    assert json.loads((base / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    adapter, _ = adapted(base, tmp_path, r=4, alpha=8, targets=PHI3_ALL)
    keys, tensors, types = read(export_gguf(adapter, tmp_path / "m.gguf", format="gguf", outtype="q8_0")["gguf"])
    # the converter's Phi3MiniModel: the factors as tensors (F32), the attention factor sqrt(1 + ln(s) / ln(orig))
    assert types["rope_factors_long.weight"] == types["rope_factors_short.weight"] == "F32"
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"], np.float32(long))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"], np.float32(short))
    assert keys["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(256)))
    assert keys["phi3.rope.scaling.original_context_length"] == 256 and keys["phi3.context_length"] == 1024
    assert keys["phi3.attention.sliding_window"] == 512 and "phi3.rope.scaling.type" not in keys


def test_gemma_merged_from_a_model_directory_is_the_merged_model(tmp_path, cache, smollm2_tokenizer, monkeypatch):
    """Gemma 1 (transformers' GGUF loader does not read it): the file's tensors, read with numpy, are the merged
    model's (norms stored as 1 + w, no output.weight: llama.cpp's gemma ties the head), and a GemmaForCausalLM built
    from the file alone (its key-values, its tensors) gives the merged logits."""
    import gguf
    import transformers as tf

    tok = smollm2_tokenizer
    config = tf.GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = tiny_base(tmp_path, tok, config, monkeypatch)
    adapter, adapted_model = adapted(base, tmp_path, r=4, alpha=8)
    keys, tensors, types = read(export_gguf(adapter, tmp_path / "m.gguf", format="gguf", outtype="f32")["gguf"])
    merged = unload(adapted_model, merge=True).eval()

    assert keys["general.architecture"] == "gemma"
    kv = {k.removeprefix("gemma."): v for k, v in keys.items() if k.startswith("gemma.")}
    assert kv == {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 96,
                  "attention.head_count": 4, "attention.head_count_kv": 1, "attention.key_length": 32,
                  "attention.value_length": 32, "attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
                  "vocab_size": len(tok), "rope.dimension_count": 32, "rope.freq_base": 10000.0}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA, 2)
    state = merged.state_dict()
    hf = {names.get_name(n, try_suffixes=(".weight",)): n for n in state if n != "lm_head.weight"}
    assert set(tensors) == set(hf) and "output.weight" not in tensors
    for name, hf_name in hf.items():
        offset = 1.0 if hf_name.endswith("norm.weight") else 0.0
        np.testing.assert_array_equal(tensors[name], state[hf_name].numpy() + np.float32(offset), err_msg=name)

    # the file alone, as llama.cpp reads it
    rebuilt = tf.GemmaConfig(vocab_size=len(keys["tokenizer.ggml.tokens"]), hidden_size=kv["embedding_length"],
                             intermediate_size=kv["feed_forward_length"], num_hidden_layers=kv["block_count"],
                             num_attention_heads=kv["attention.head_count"], head_dim=kv["attention.key_length"],
                             num_key_value_heads=kv["attention.head_count_kv"], rope_theta=kv["rope.freq_base"],
                             rms_norm_eps=kv["attention.layer_norm_rms_epsilon"], tie_word_embeddings=True)
    model = tf.GemmaForCausalLM(rebuilt).eval()
    model.load_state_dict({hf_name: torch.from_numpy(tensors[n] - (1.0 if hf_name.endswith("norm.weight") else 0.0))
                           for n, hf_name in hf.items()}, strict=False)
    ids = torch.tensor([[1, 5, 9, 30, 2, 17, 33, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
