"""Nothing lost, nothing silently wrong: what train, eval and merge may write and delete, which checkpoints a
resume accepts, and what a full disk does (issue 15, items 1-4, 6, 11, 12 and the disk/metrics tracebacks)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import fill
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.files import OutputLock
from lorakit.train import checkpoint as ckpt
from lorakit.train import run
from test_trainer import CrashAt, cfg_for


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def train_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--steps", "4", "--batch-size", "8", "--rank", "4",
            "--save-every", "4", "--out", out, "--quiet", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in train_args(tiny_bert_dir, sentiment_csv, out)]) == 0
    return out


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- 1. eval writes and deletes nothing
def test_eval_leaves_the_temporary_directory_alone(capsys, finished_run, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("somebody's file\n")
    before = snapshot(finished_run)
    code, out, err = cli(capsys, "eval", "--adapter", finished_run, "--data", sentiment_csv)
    assert code == 0, err
    assert (tmp_path / "metrics.jsonl").read_text() == "somebody's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert snapshot(finished_run) == before


# ---------------------------------------------------------------------- 2. train into a non-empty directory
def test_train_refuses_a_non_empty_out_unless_told(capsys, tiny_bert_dir, sentiment_csv, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in (("run.json", "{}"), ("metrics.jsonl", "mine\n"), ("training.png", "png"), ("notes.txt", "keep")):
        (out / name).write_text(text)
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out))
    assert code == 2 and err.startswith("lorakit: error: --out") and "already holds files" in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "run.json").read_text() == "{}" and (out / "metrics.jsonl").read_text() == "mine\n"
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--resume"))
    assert code == 2 and "no checkpoint to continue from" in err
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--overwrite"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep"  # not one of a run's files: left alone
    assert json.loads((out / "run.json").read_text())["result"]["steps"] == 4
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--overwrite", "--resume"))
    assert code == 2 and "give one of them" in err


def test_overwrite_drops_the_previous_runs_checkpoints(tiny_bert_dir, sentiment_csv, tmp_path):
    run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, steps=12, save_every=4))
    assert ckpt.latest(tmp_path / "checkpoints").step == 12
    run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, steps=8, save_every=4, overwrite=True))
    steps = sorted(ckpt.step_of(p) for p in (tmp_path / "checkpoints").iterdir())
    assert steps == [4, 8]  # not the old run's step 12, which a later --resume would have taken


# ---------------------------------------------------------------------- 3 and 6. outputs that are inputs
def test_merge_refuses_an_out_that_is_in_or_around_the_adapter(capsys, finished_run, tmp_path):
    before = snapshot(finished_run)
    for out in (finished_run, finished_run / "merged", finished_run.parent):
        code, _, err = cli(capsys, "merge", "--adapter", finished_run, "--out", out, "--overwrite")
        assert code == 2 and "--adapter" in err and "Choose an --out outside it" in err, err
    assert snapshot(finished_run) == before


def test_merge_refuses_the_model_directory(capsys, finished_run, tiny_bert_dir):
    before = snapshot(tmp := __import__("pathlib").Path(tiny_bert_dir))
    code, _, err = cli(capsys, "merge", "--adapter", finished_run, "--model", tiny_bert_dir, "--out", tiny_bert_dir,
                       "--overwrite")
    assert code == 2 and "is the --model" in err
    assert snapshot(tmp) == before


def test_train_refuses_to_write_into_a_model_directory(capsys, tiny_bert_dir, sentiment_csv, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    before = snapshot(model)
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, _, err = cli(capsys, *train_args(model, sentiment_csv, model, *extra))
        assert code == 2 and "is a model directory" in err
    code, _, err = cli(capsys, "train", "--out", model, "--overwrite")  # another (built-in) model, this directory
    assert code == 2 and "is a model directory" in err
    assert snapshot(model) == before


# ---------------------------------------------------------------------- 4. a resume continues the same run only
@pytest.fixture(scope="module")
def other_inputs(tmp_path_factory, tiny_bert_dir, sentiment_csv):
    import transformers as tf

    folder = tmp_path_factory.mktemp("other")
    torch.manual_seed(1)
    model = tf.BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(folder / "model")
    for name in os.listdir(tiny_bert_dir):
        if "token" in name or name == "vocab.txt":
            shutil.copy(os.path.join(tiny_bert_dir, name), folder / "model")
    lines = open(sentiment_csv).read().splitlines()
    (folder / "data.csv").write_text("\n".join(lines[:1] + lines[1:][::-1]) + "\n")  # the same rows, other order
    return str(folder / "model"), str(folder / "data.csv")


@pytest.mark.parametrize("change,field", [
    (["--lr", "0.5"], "--lr"), (["--alpha", "4"], "--alpha"), (["--rslora"], "--rslora"), (["--dropout", "0.1"], "--dropout"),
    (["--batch-size", "4"], "--batch-size"), (["--seed", "3"], "--seed"), (["--max-length", "16"], "--max-length"),
    (["--init", "gaussian"], "--init"), (["--rank", "2"], "--rank"), (["--targets", "attn-qkv"], "--targets"),
    (["--steps", "8"], "--steps"), (["--weight-decay", "0.1"], "--weight-decay"), (["MODEL"], "--model"),
    (["DATA"], "--data"),
])
def test_resume_refuses_a_checkpoint_of_another_run(capsys, tmp_path, tiny_bert_dir, sentiment_csv, other_inputs,
                                                    change, field):
    out = tmp_path / "run"
    assert cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out))[0] == 0
    model, data = tiny_bert_dir, sentiment_csv
    if change == ["MODEL"]:
        model, change = other_inputs[0], []
    if change == ["DATA"]:
        data, change = other_inputs[1], []
    before = snapshot(out)
    code, _, err = cli(capsys, *train_args(model, data, out, "--resume", *change))
    assert code == 2 and "was written by a different run" in err and f"{field} " in err, err
    assert "Resume with the options of that run" in err
    assert snapshot(out) == before


def test_resume_refuses_a_model_changed_in_place(capsys, tmp_path, tiny_bert_dir, sentiment_csv, other_inputs):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    out = tmp_path / "run"
    assert cli(capsys, *train_args(model, sentiment_csv, out))[0] == 0
    shutil.rmtree(model)
    shutil.copytree(other_inputs[0], model)  # same path, other weights
    code, _, err = cli(capsys, *train_args(model, sentiment_csv, out, "--resume"))
    assert code == 2 and "the base model's weights differ" in err


def test_resume_accepts_changes_that_do_not_change_the_run(capsys, tmp_path, tiny_bert_dir, sentiment_csv):
    out = tmp_path / "run"
    assert cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out))[0] == 0
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--resume", "--eval-every", "2",
                                           "--log-every", "1", "--save-every", "2", "--eval-limit", "10"))
    assert code == 0, err


# ---------------------------------------------------------------------- 11. the adapter is saved as one unit
def test_adapter_files_from_different_saves_are_refused(make_model, tmp_path):
    base = make_model("llama")
    first = lorakit.attach(base, lorakit.LoraConfig(r=4, alpha=8))
    lorakit.save_adapter(first, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left behind
    lorakit.unload(first)
    second = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, alpha=32))
    lorakit.save_adapter(second, tmp_path / "b")
    torn = tmp_path / "torn"  # what a kill between the two renames of a re-save used to leave
    torn.mkdir()
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", torn)
    shutil.copy(tmp_path / "a" / "adapter_config.json", torn)
    with pytest.raises(LorakitError, match=r"lora_alpha=8 but adapter_model.safetensors was saved with lora_alpha=32"):
        lorakit.load_adapter(make_model("llama"), torn)
    # a hand edit that does not change what the weights mean is fine
    doc = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    doc["base_model_name_or_path"] = "/somewhere/else"
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(doc))
    lorakit.load_adapter(make_model("llama"), tmp_path / "b")


# ---------------------------------------------------------------------- 12. one run per --out
def test_a_second_run_into_the_same_out_is_refused(capsys, tiny_bert_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    with OutputLock(out):  # as a run in another process holds it
        code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out))
        assert code == 2 and f"another lorakit train (pid {os.getpid()}) is writing to" in err
        code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--resume"))
        assert code == 2 and "another lorakit train" in err
    assert cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out))[0] == 0
    assert not (out / ".lorakit.lock").exists()


# ---------------------------------------------------------------------- tracebacks: metrics and a full disk
def test_resume_after_a_torn_metrics_line(tiny_bert_dir, sentiment_csv, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path), hooks=[CrashAt(6)])
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "train", "lo')  # killed in the middle of a write
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, tmp_path, resume=True))
    assert report["result"]["steps"] == 12
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "eval" and records[-1]["step"] == 12


class FillDiskAt:
    """After optimizer step ``step``, fill the disk that --out is on."""

    def __init__(self, step, disk):
        self.step, self.disk = step, disk

    def after_step(self, step, model):
        if step == self.step:
            fill(self.disk)


@pytest.mark.parametrize("full_at,needle", [(5, "cannot write checkpoint"), (9, "the adapter could not be saved")])
def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tiny_bert_dir, sentiment_csv, small_disk, full_at,
                                                                  needle):
    out = small_disk / "run"
    cfg = cfg_for(tiny_bert_dir, sentiment_csv, out, steps=9 if full_at == 9 else 12, save_every=4, eval_every=100)
    with pytest.raises(LorakitError, match=needle) as exc:
        run(cfg, hooks=[FillDiskAt(full_at, small_disk)])
    assert "No space left on device" in str(exc.value)
    found = ckpt.latest(out / "checkpoints")
    assert found.step == (4 if full_at == 5 else 8) and not found.skipped  # complete and verified
    (small_disk / "filler").unlink()
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, out, steps=cfg.steps, save_every=4, eval_every=100, resume=True))
    assert report["result"]["steps"] == cfg.steps
    assert all(torch.isfinite(w).all() for w in load_file(out / "adapter_model.safetensors").values())


def test_full_disk_through_the_command_line(tiny_bert_dir, sentiment_csv, small_disk):
    fill(small_disk)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "lorakit", *train_args(tiny_bert_dir, sentiment_csv, small_disk / "run")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("lorakit: error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "No space left on device" in proc.stderr
