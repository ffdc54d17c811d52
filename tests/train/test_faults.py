"""Training that loses nothing: non-finite steps are skipped and counted, too many in a row stop the run with
the last good checkpoint intact, and SIGTERM ends a run cleanly with a resumable checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import TrainConfig, run
from lorakit.train import checkpoint as ckpt
from lorakit.train import trainer as trainer_module
from lorakit.train.trainer import TrainingError, resume_command


def cfg_for(model_dir, data, out, **kw):
    base = dict(model=model_dir, data=data, out=str(out), steps=12, batch_size=8, save_every=4, log_every=2,
                eval_every=6, quiet=True, rank=4, alpha=8, lr=5e-3)
    base.update(kw)
    return TrainConfig(**base)


def nan_on(calls):
    """training_loss that returns NaN (keeping the graph) on the given 1-based call numbers."""
    real, count = trainer_module.training_loss, {"n": 0}

    def loss(model, batch):
        count["n"] += 1
        value = real(model, batch)
        return value * float("nan") if count["n"] in calls else value

    return loss


def test_non_finite_steps_are_skipped_and_counted(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "training_loss", nan_on({3, 4}))
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path))
    assert report["skipped_steps"] == 2
    assert report["result"]["steps"] == 12  # the run still makes all its updates
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "skipped_step"] == [2, 2]


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "training_loss", nan_on(set(range(6, 1000))))
    with pytest.raises(TrainingError, match=r"3 steps in a row .* last good checkpoint is .*step-000004"):
        run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, max_bad_steps=3))
    found = ckpt.latest(tmp_path / "checkpoints")
    assert found.step == 4 and not found.skipped  # complete and verified


def test_resume_command_adds_resume_once():
    assert resume_command(["train", "--out", "my run"]) == "lorakit train --out 'my run' --resume"
    assert resume_command(["train", "--resume"]) == "lorakit train --resume"


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny_bert_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps", "5000", "--batch-size", "8",
            "--rank", "4", "--save-every", "100000", "--eval-every", "100000", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None \
            and not (metrics.exists() and '"event": "train"' in metrics.read_text()):  # logged every 10 steps
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "Resume with: lorakit train" in stderr and "--resume" in stderr
    found = ckpt.latest(out / "checkpoints")
    assert found is not None and found.step >= 1
    # resume in-process with the same settings; a second SIGTERM, sent by a hook two steps later, stops it again
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, out, steps=5000, resume=True, save_every=100000,
                         eval_every=100000), hooks=[TermAt(found.step + 2)])
    assert report["result"]["resumed_from"] == str(found.path)
    assert report["result"]["stopped_at"] == found.step + 2 and report["result"]["stopped_by"] == "SIGTERM"
    assert ckpt.latest(out / "checkpoints").step == found.step + 2


class TermAt:
    def __init__(self, step):
        self.step = step

    def after_step(self, step, model):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
