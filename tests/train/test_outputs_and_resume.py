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


# ---------------------------------------------------------------------- issue 33, 1-3: --overwrite and --resume lose nothing
def finished_copy(finished_run, tmp_path):
    """A finished run (adapter, run.json, checkpoints) with a user's own file beside it."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "notes.txt").write_text("mine")
    return out


def bad_csv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('text,label\n"fine",pos\n"unclosed,neg\n')
    return ["--data", p]


def missing_column(tmp_path):
    p = tmp_path / "nolabel.csv"
    p.write_text("sentence,label\nok,pos\nfine,neg\n")
    return ["--data", p, "--label-column", "stars"]


@pytest.mark.parametrize("make_bad", [
    bad_csv,
    missing_column,
    lambda tmp: ["--rank", "100000"],
    lambda tmp: ["--targets", "no_such_module"],
    lambda tmp: ["--model", tmp / "missing-model"],
], ids=["malformed-row", "missing-column", "rank-too-big", "unknown-target", "missing-model"])
def test_overwrite_that_fails_before_training_keeps_the_previous_run(capsys, finished_run, tiny_bert_dir, sentiment_csv,
                                                                     tmp_path, make_bad):
    out = finished_copy(finished_run, tmp_path)
    before = snapshot(out)
    args = train_args(tiny_bert_dir, sentiment_csv, out, "--overwrite", *make_bad(tmp_path))
    code, _, err = cli(capsys, *args)
    assert code == 2 and err.startswith("lorakit: error:") and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before  # byte for byte: the adapter, run.json, metrics, checkpoints, notes.txt
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in finished_run.iterdir()] + ["notes.txt"])


def test_overwrite_interrupted_before_its_first_checkpoint_keeps_the_previous_run(finished_run, tiny_bert_dir,
                                                                                  sentiment_csv, tmp_path):
    out = finished_copy(finished_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C at step 2, the first checkpoint would be at step 4
        run(cfg_for(tiny_bert_dir, sentiment_csv, out, steps=8, save_every=4, overwrite=True), hooks=[CrashAt(2)])
    assert snapshot(out) == before  # the new run's metrics.jsonl went, the old one is back


def test_overwrite_interrupted_after_its_first_checkpoint_is_the_new_run(finished_run, tiny_bert_dir, sentiment_csv,
                                                                         tmp_path):
    out = finished_copy(finished_run, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tiny_bert_dir, sentiment_csv, out, steps=12, save_every=4, overwrite=True), hooks=[CrashAt(6)])
    assert [ckpt.step_of(p) for p in sorted((out / "checkpoints").iterdir())] == [4]  # the new run's, resumable
    assert not (out / ".lorakit-replaced").exists() and (out / "notes.txt").read_text() == "mine"
    report = run(cfg_for(tiny_bert_dir, sentiment_csv, out, steps=12, save_every=4, resume=True))
    assert report["result"]["resumed_from"].endswith("step-000004")


def test_a_run_killed_outright_during_overwrite_is_settled_by_the_next_one(capsys, finished_run, tiny_bert_dir,
                                                                           sentiment_csv, tmp_path):
    from lorakit.train.run_dir import REPLACED, move_aside

    out = finished_copy(finished_run, tmp_path)
    before = snapshot(out)
    move_aside(out, keep=set())  # what a SIGKILLed --overwrite leaves: the old run aside, a partial new metrics.jsonl
    (out / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    assert (out / REPLACED).is_dir() and not (out / "adapter_model.safetensors").exists()
    code, out_text, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--resume"))
    assert code == 0, err  # the old run came back first, then --resume took it up at its step 4
    assert "the previous run's files" in out_text and "are back" in out_text
    assert not (out / REPLACED).exists()
    assert json.loads((out / "run.json").read_text())["result"]["resumed_from"].endswith("step-000004")
    assert (out / "notes.txt").read_text() == "mine"
    assert set(before) <= set(snapshot(out))


def test_overwrite_that_succeeds_replaces_exactly_the_listed_files(capsys, finished_run, tiny_bert_dir, sentiment_csv,
                                                                  tmp_path):
    out = finished_copy(finished_run, tmp_path)
    old = snapshot(out)
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--overwrite", "--steps", "2",
                                           "--save-every", "2", "--seed", "7"))
    assert code == 0, err
    assert not (out / ".lorakit-replaced").exists() and (out / "notes.txt").read_text() == "mine"
    assert [ckpt.step_of(p) for p in sorted((out / "checkpoints").iterdir())] == [2]
    assert snapshot(out)["adapter_model.safetensors"] != old["adapter_model.safetensors"]


def test_overwrite_never_moves_or_deletes_an_input_of_the_run(capsys, tiny_chat_llama_dir, tmp_path):
    from conftest import CHAT_DATA

    out = tmp_path / "chat"
    out.mkdir()
    template = out / "chat_template.jinja"  # the user keeps their template in --out and trains with it
    from lorakit.train.models import load_tokenizer

    text = load_tokenizer(str(tiny_chat_llama_dir)).chat_template
    template.write_text(text)
    data = out / "chat.jsonl"
    shutil.copy(CHAT_DATA, data)
    args = ["train", "--model", tiny_chat_llama_dir, "--data", data, "--chat-template", template, "--steps", "1",
            "--batch-size", "4", "--max-length", "64", "--out", out, "--quiet"]
    for extra in (["--overwrite"], ["--overwrite"]):  # the second run replaces the first's files, not its inputs
        code, _, err = cli(capsys, *args, *extra)
        assert code == 0, err
        assert template.read_text() == text and data.read_bytes() == CHAT_DATA.read_bytes()
    shutil.copy(CHAT_DATA, out / "metrics.jsonl")  # an input named as a file the run writes: refused, untouched
    code, _, err = cli(capsys, *args[:4], out / "metrics.jsonl", *args[5:], "--overwrite")
    assert code == 2 and "--data" in err and "move it out of --out" in err, err
    assert (out / "metrics.jsonl").read_bytes() == CHAT_DATA.read_bytes()


@pytest.mark.parametrize("contents", [
    {"notes.txt": "mine"},
    {"photos/cat.jpg": "jpeg"},
    {"checkpoints/readme.txt": "not a checkpoint", "data.csv": "a,b\n"},
], ids=["a-file", "a-folder", "an-empty-checkpoints-folder"])
def test_resume_refuses_a_directory_that_is_not_a_run(capsys, tiny_bert_dir, sentiment_csv, tmp_path, contents):
    out = tmp_path / "mine"
    for name, text in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before, paths = snapshot(out), sorted(out.rglob("*"))
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--resume"))
    assert code == 2 and "no checkpoint to continue from" in err and "not a lorakit run" in err, err
    assert snapshot(out) == before and sorted(out.rglob("*")) == paths  # nothing written, nothing deleted


def test_resume_into_an_empty_or_new_directory_starts_at_step_0(capsys, tiny_bert_dir, sentiment_csv, tmp_path):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--resume", "--steps", "1"))
        assert code == 0, err
        assert json.loads((out / "run.json").read_text())["result"]["resumed_from"] is None


def test_the_readme_lists_the_files_overwrite_replaces():
    """The README's list and the code's are one list (issue 33, 2)."""
    import re
    from pathlib import Path

    from lorakit.train.run_dir import RUN_FILES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    paragraph = readme[readme.index("`--overwrite` replaces it"):][:600]
    listed = re.findall(r"`([\w.-]+\.\w+)`", paragraph.split("any other file")[0])
    assert sorted(listed) == sorted(RUN_FILES), listed


def test_overwrite_that_cannot_move_the_previous_run_aside_leaves_it_whole(capsys, finished_run, tiny_bert_dir,
                                                                         sentiment_csv, tmp_path, monkeypatch):
    from lorakit.train import run_dir

    out = finished_copy(finished_run, tmp_path)
    (out / run_dir.REPLACED).write_text("a file where the folder would go")  # mkdir fails
    before = snapshot(out)
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--overwrite"))
    assert code == 2 and "cannot move the previous run's files aside" in err and len(err.splitlines()) == 1, err
    assert snapshot(out) == before
    (out / run_dir.REPLACED).unlink()
    moved, real_move = [], run_dir._move

    def move_then_fail(src, dst):  # the third rename fails (a full or read-only disk): the first two come back
        if len(moved) == 2 and dst.parent.name == run_dir.REPLACED:
            raise OSError(28, "No space left on device")
        moved.append(src)
        real_move(src, dst)

    monkeypatch.setattr(run_dir, "_move", move_then_fail)
    code, _, err = cli(capsys, *train_args(tiny_bert_dir, sentiment_csv, out, "--overwrite"))
    assert code == 2 and "No space left on device" in err and "they are where they were" in err, err
    del before[run_dir.REPLACED]
    assert snapshot(out) == before and not (out / run_dir.REPLACED).exists()
