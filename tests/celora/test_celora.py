"""CE-LoRA in lorakit train: the trainer drives the refreshes, and a resume restores the feature cache."""

import json

import pytest
import torch


def test_trainer_drives_refreshes_by_step(tiny_llama_dir, corpus_txt, tmp_path):
    from conftest import train_config
    from lorakit.train import run

    run(train_config(model=tiny_llama_dir, data=corpus_txt, out=str(tmp_path), steps=8, batch_size=2, grad_accum=4,
                    max_length=32, targets="all-linear", backward="celora", keep_ratio=0.5, refresh_every=3,
                    quiet=True, log_every=100, save_every=None))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("celora_refreshed_layers")] == [1, 4, 7]


def test_resume_restores_the_feature_cache(tiny_llama_dir, corpus_txt, tmp_path):
    from safetensors.torch import load_file

    from conftest import train_config
    from lorakit.train import run

    def cfg(out, **kw):
        return train_config(model=tiny_llama_dir, data=corpus_txt, out=str(out), steps=9, batch_size=4, max_length=32,
                           targets="all-linear", backward="celora", keep_ratio=0.5, refresh_every=4, save_every=3,
                           selection="sample", quiet=True, **kw)

    class Crash:
        def after_step(self, step, model):
            if step == 5:
                raise KeyboardInterrupt

    run(cfg(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path / "cut"), hooks=[Crash()])
    run(cfg(tmp_path / "cut", resume=True))
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
