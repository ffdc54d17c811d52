import json
import os

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError
from conftest import train_config
from lorakit.train import TrainConfig, run
from lorakit.train import checkpoint as ckpt
from lorakit.train.state import linear_schedule


def cfg_for(model_dir, data, out, **kw):
    base = dict(model=model_dir, data=data, out=str(out), steps=12, batch_size=8, save_every=4, log_every=2,
                eval_every=6, quiet=True, rank=4, alpha=8, lr=5e-3)
    base.update(kw)
    return train_config(**base)


def adapter_weights(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_classification_run_writes_everything(tiny_bert_dir, sentiment_csv, tmp_path):
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, steps=30, lr=1e-2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoints", "metrics.jsonl", "run.json", "training.png"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12, 18, 24, 30]
    assert report["labels"] == ["neg", "pos"]
    assert report["result"]["after"]["eval_loss"] < report["result"]["before"]["eval_loss"]
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2  # keep_checkpoints


class CrashAt:
    """Simulates an interruption right after optimizer step ``step`` (before it is checkpointed)."""

    def __init__(self, step):
        self.step = step

    def after_step(self, step, model):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("task_dir,data_fixture,extra", [
    ("tiny_bert_dir", "sentiment_csv", dict(dropout=0.1)),
    ("tiny_llama_dir", "corpus_txt", dict(grad_accum=2, max_length=32)),
    ("tiny_bert_dir", "sentiment_csv", dict(dropout=0.1, gradient_checkpointing=True)),
    ("tiny_llama_dir", "corpus_txt", dict(max_length=32, gradient_checkpointing=True, base_dtype="bf16")),
])
def test_resume_matches_uninterrupted_run(request, tmp_path, task_dir, data_fixture, extra):
    """Acceptance 5: interrupted after a checkpoint, resumed: the same adapter weights."""
    model_dir, data = request.getfixturevalue(task_dir), request.getfixturevalue(data_fixture)
    full = tmp_path / "full"
    run(cfg_for(model_dir, data, full, **extra))
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(model_dir, data, broken, **extra), hooks=[CrashAt(7)])
    assert ckpt.latest(broken / "checkpoints").step == 4
    report = run(cfg_for(model_dir, data, broken, resume=True, **extra))
    assert report["result"]["resumed_from"].endswith("step-000004")  # not a silent restart from step 0
    a, b = adapter_weights(full), adapter_weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)


def test_resume_with_different_length_is_refused(tiny_bert_dir, sentiment_csv, tmp_path):
    run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, steps=4))
    with pytest.raises(ConfigError, match="different run: --steps 8 here, 4 in the checkpoint"):
        run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, steps=8, resume=True))


def test_checkpoints_verify_and_skip_damaged(tmp_path):
    def files(n):
        return lambda d: (d / "a.bin").write_bytes(bytes([n]) * 10)

    for step in (1, 2, 3):
        ckpt.write(tmp_path, step, files(step))
    assert ckpt.latest(tmp_path).step == 3
    (tmp_path / "step-000003" / "a.bin").write_bytes(b"x")  # damaged after the fact
    (tmp_path / "step-000004").mkdir()  # interrupted before its manifest
    found = ckpt.latest(tmp_path)
    assert found.step == 2 and len(found.skipped) == 2
    ckpt.prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003", "step-000004"]


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path):
    ckpt.write(tmp_path, 1, lambda d: (d / "a.bin").write_bytes(b"good"))

    def fail(d):
        (d / "a.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match="No space left.*earlier checkpoints are untouched"):
        ckpt.write(tmp_path, 2, fail)
    assert ckpt.latest(tmp_path).step == 1 and [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_schedule_warms_up_then_decays():
    f = linear_schedule(4, 10)
    assert [round(f(s), 3) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.833, 0.667, 0.5, 0.333, 0.167]


def test_bad_training_options():
    with pytest.raises(ConfigError, match="batch_size=0"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="either --epochs or --steps"):
        TrainConfig(epochs=1, steps=2).validate()
    with pytest.raises(ConfigError, match="lr=-0.1"):
        TrainConfig(lr=-0.1).validate()


def test_hf_trainer_trains_an_attached_model(make_model, tmp_path):
    """A user can hand an attached model to transformers' Trainer: only the adapter moves."""
    from transformers import Trainer, TrainingArguments

    model = lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(r=4, targets="attn-qkv"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 90, (12,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
                             save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters and "lora_B" in n)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_bf16_training_tracks_float32(tiny_llama_dir, corpus_txt, tmp_path, monkeypatch):
    """--bf16 where bf16 pays: frozen weights in bf16 on CPU; the held-out loss ends within 2% of float32 training."""
    import lorakit.speed.gemm as gemm

    monkeypatch.setattr(gemm, "bf16_decision", lambda device="cpu": (True, "bf16 measured faster (test)"))
    a = run(cfg_for(tiny_llama_dir, corpus_txt, tmp_path / "fp32", max_length=32))
    b = run(cfg_for(tiny_llama_dir, corpus_txt, tmp_path / "bf16", max_length=32, bf16=True))
    fp32, bf16 = a["result"]["after"]["eval_loss"], b["result"]["after"]["eval_loss"]
    assert bf16 < b["result"]["before"]["eval_loss"]
    assert abs(bf16 - fp32) / fp32 < 0.02
    assert all(v.dtype == torch.float32 for v in adapter_weights(tmp_path / "bf16").values())
    assert (b["precision"]["base_dtype"], b["precision"]["compute_dtype"]) == ("bf16", "bf16")
    assert "bf16 measured faster (test)" in b["precision"]["why"]
    assert (a["precision"]["base_dtype"], a["precision"]["compute_dtype"]) == ("fp32", "fp32")


def test_bf16_where_it_would_be_slower_keeps_fp32_and_says_so(tiny_llama_dir, corpus_txt, tmp_path, monkeypatch):
    import lorakit.adapters.precision as precision
    import lorakit.speed.gemm as gemm

    monkeypatch.setattr(gemm, "bf16_decision", lambda device="cpu": (False, "bf16 would be slower (test)"))
    applied = []
    monkeypatch.setattr(precision, "use_bf16", lambda model, *a, **kw: applied.append(model))
    report = run(cfg_for(tiny_llama_dir, corpus_txt, tmp_path, max_length=32, bf16=True))
    assert (report["precision"]["base_dtype"], report["precision"]["compute_dtype"]) == ("fp32", "fp32") and not applied
    assert "--bf16: bf16 would be slower (test)" in report["precision"]["why"]


def test_one_process_does_no_distributed_work(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    """Single-process runs take no collective (the distributed arithmetic lives behind Dist.active)."""
    import torch.distributed as td

    def refuse(*args, **kwargs):
        raise AssertionError("a collective on one process")

    for name in ("all_reduce", "broadcast", "all_gather_object", "broadcast_object_list", "barrier", "init_process_group"):
        monkeypatch.setattr(td, name, refuse)
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, steps=4, grad_accum=2))
    assert report["result"]["steps"] == 4 and report["processes"] == 1


@pytest.mark.parametrize("given,named", [
    (dict(packing=True), "--packing"),
    (dict(loss_on="all"), "--loss-on all"),
    (dict(packing=True, loss_on="all"), "--packing and --loss-on all"),
])
def test_causal_lm_options_on_a_classifier_are_refused_not_ignored(tiny_bert_dir, sentiment_csv, tmp_path, given, named):
    """issue 33, 9: --packing and --loss-on shape causal-LM rows; on a classification run they did nothing, silently."""
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{named} shape causal-LM training rows, but .* is trained as classify; drop"):
        run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path / "out", **given))
    assert not (tmp_path / "out").exists()
    run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path / "ok", steps=1, packing=False))  # --no-packing says no more


def test_causal_lm_evaluation_takes_the_fused_head_and_equals_the_models_own_loss(monkeypatch):
    """Held-out loss through the fused head (no N x V logits) equals transformers' own loss."""
    from conftest import tiny_model
    from lorakit.speed.forward import own_forward
    from lorakit.train import evaluation as T

    model = tiny_model("llama")
    lorakit.attach(model, lorakit.LoraConfig(r=4, targets="all-linear"))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (n,), generator=g).tolist()} for n in (5, 9, 7)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    fused = T.evaluate(model, rows, "causal-lm", pad_id=0, batch_size=2)
    calls = []
    monkeypatch.setattr(T, "fused_loss_forward", lambda *a: calls.append(a))  # None: the model's own forward
    with own_forward(model):
        own = T.evaluate(model, rows, "causal-lm", pad_id=0, batch_size=2)
    assert calls  # the fused path was asked first
    assert fused["eval_loss"] == pytest.approx(own["eval_loss"], rel=1e-6)
