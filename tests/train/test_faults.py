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

from lorakit.train import run
from lorakit.train import checkpoint as ckpt
from lorakit.train.distributed import LossOf  # where the trainer takes its loss from
from lorakit.errors import TrainingError
from lorakit.train.run_dir import resume_command
from test_trainer import cfg_for  # the same small runs as the trainer's tests


def nan_on(calls):
    """LossOf.forward whose training loss is NaN (keeping the graph) on the given 1-based call numbers."""
    real, count = LossOf.forward, {"n": 0}

    def forward(self, batch, outputs=False):
        if outputs:
            return real(self, batch, outputs)
        count["n"] += 1
        value = real(self, batch)
        return value * float("nan") if count["n"] in calls else value

    return forward


def test_non_finite_steps_are_skipped_and_counted(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(LossOf, "forward", nan_on({3, 4}))
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path))
    assert report["skipped_steps"] == 2
    assert report["result"]["steps"] == 12  # the run still makes all its updates
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "skipped_step"] == [2, 2]


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(LossOf, "forward", nan_on(set(range(6, 1000))))
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
                         eval_every=100000, alpha=16.0, lr=None), hooks=[TermAt(found.step + 2)])  # the CLI's values
    assert report["result"]["resumed_from"] == str(found.path)
    assert report["result"]["stopped_at"] == found.step + 2 and report["result"]["stopped_by"] == "SIGTERM"
    assert ckpt.latest(out / "checkpoints").step == found.step + 2


class TermAt:
    def __init__(self, step):
        self.step = step

    def after_step(self, step, model):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigkill_at_random_moments_never_loses_work(tiny_bert_dir, sentiment_csv, tmp_path):
    """Acceptance 4 of the faults issue: 20 kills -9 at random moments (checkpoints are written after every step,
    so many land inside a write); each restart resumes from a complete checkpoint, and the final adapter equals
    the uninterrupted run's."""
    import random

    steps = 400
    ref = tmp_path / "ref"
    run(cfg_for(tiny_bert_dir, sentiment_csv, ref, steps=steps, save_every=1, eval_every=1000))
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "lorakit", "train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps",
            str(steps), "--batch-size", "8", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--save-every", "1",
            "--eval-every", "1000", "--quiet", "--resume", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    rng = random.Random(0)
    kills, progress = 0, []
    while kills < 20:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        before = ckpt.latest(out / "checkpoints")
        start = before.step if before else 0
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:  # wait until it has trained past its start
            now = ckpt.latest(out / "checkpoints")
            if now is not None and now.step > start:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
            break  # it finished before this kill
        proc.kill()
        proc.wait()
        kills += 1
        found = ckpt.latest(out / "checkpoints")
        assert found is not None and found.step >= start  # a complete, verified checkpoint; no work lost
        progress.append(found.step)
    if not (out / "adapter_model.safetensors").exists() or ckpt.latest(out / "checkpoints").step < steps:
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(str(ref / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert kills >= 10, f"only {kills} kills landed before the run finished: {progress}"
