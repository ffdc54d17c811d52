"""Training on two processes (torchrun: gloo on CPU, nccl on two GPUs) against the same run on one process.

Acceptance 1-3 of the distributed-training issue: DDP over the adapter gives the one-process
adapter (within 1e-5), FSDP2 --shard the one-process losses (rtol 1e-4), and checkpoints move
between process counts. Each two-process run is a real ``lorakit train --nproc 2`` (torchrun).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_config
from lorakit.train import run
from lorakit.train import checkpoint as ckpt
from lorakit.train.distributed import Dist, epoch_indices, real_rows
from lorakit.train.run_dir import resume_command

SETTINGS = dict(steps=20, batch_size=8, grad_accum=2, max_length=32, targets="all-linear", rank=4, alpha=8.0, lr=5e-3,
                save_every=10, eval_every=10, log_every=1, quiet=True)


def config(model_dir, data, out, **kw):
    return train_config(model=model_dir, data=data, out=str(out), **{**SETTINGS, **kw})


def cli_args(model_dir, data, out, **kw):
    args = ["--model", model_dir, "--data", data, "--out", str(out)]
    for key, value in {**SETTINGS, **kw}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def lorakit_train(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def assert_same_adapter(a_dir, b_dir, atol=1e-5):
    a, b = adapter(a_dir), adapter(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def train_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def resume_from(source, step, out):
    """A fresh run directory holding only checkpoint ``step`` of ``source``."""
    (out / "checkpoints").mkdir(parents=True)
    name = f"step-{step:06d}"
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name)
    return out


# The process group's backend, and the device its processes train on: the same equality tests run on both.
BACKENDS = {"gloo": "cpu", "nccl": "cuda"}


@pytest.fixture(scope="module", params=["gloo", pytest.param("nccl", marks=pytest.mark.cuda(gpus=2))])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir, corpus_txt, tmp_path_factory, backend):
    out = tmp_path_factory.mktemp("one-process")
    run(config(tiny_llama_dir, corpus_txt, out, device=BACKENDS[backend]))
    return out


@pytest.fixture(scope="module")
def two_processes(tiny_llama_dir, corpus_txt, tmp_path_factory, backend):
    out = tmp_path_factory.mktemp("two-processes")
    proc = lorakit_train(*cli_args(tiny_llama_dir, corpus_txt, out, device=BACKENDS[backend]), "--nproc", "2")
    assert json.loads((out / "run.json").read_text())["backend"] == backend
    return out, proc


@pytest.mark.parametrize("n_rows,world,batch", [(16, 2, 8), (119, 2, 8), (23, 3, 6), (5, 2, 4)])
def test_ranks_split_exactly_the_one_process_batches(n_rows, world, batch):
    """Each global micro-batch on N ranks holds the rows of the one-process micro-batch; the sampler's padding is marked."""
    for epoch in range(2):
        one = epoch_indices(n_rows, 7, epoch, Dist())
        ranks = [Dist(rank=r, world=world) for r in range(world)]
        orders = [epoch_indices(n_rows, 7, epoch, d)[: real_rows(n_rows, d)] for d in ranks]
        assert sum(len(o) for o in orders) == n_rows
        b = batch // world
        for k in range(-(-n_rows // batch)):
            assert sorted(one[k * batch : (k + 1) * batch]) == sorted(i for o in orders for i in o[k * b : (k + 1) * b])


def test_two_processes_train_the_one_process_adapter(one_process, two_processes):
    """Acceptance 1: DDP on two processes (gloo), global batch 8 with gradient accumulation: the same adapter after 20
    steps within 1e-5; rank 0 alone writes the files, with losses and held-out metrics reduced over both ranks."""
    out, proc = two_processes
    assert_same_adapter(one_process, out)
    torch.testing.assert_close(train_losses(out), train_losses(one_process), rtol=1e-5, atol=0)
    report = json.loads((out / "run.json").read_text())
    expected = json.loads((one_process / "run.json").read_text())
    assert report["processes"] == 2 and report["sharded"] is False
    assert len(report["memory_per_process"]) == 2 and all(m["peak_rss_mib"] > 0 for m in report["memory_per_process"])
    assert report["result"]["after"]["eval_loss"] == pytest.approx(expected["result"]["after"]["eval_loss"], rel=1e-5)
    assert proc.stdout.count("held-out loss") == 1  # printed by rank 0 only
    assert len(train_losses(out)) == 20  # one line per step, not one per rank
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010", "step-000020"]


def test_two_processes_classification(tiny_bert_dir, sentiment_csv, tmp_path):
    """The same for a classifier (loss a mean over rows), across the end of an epoch (216 rows, global batch 10)."""
    settings = dict(targets="attn-qv", batch_size=10, steps=12, max_length=None, save_every=100)
    one, two = tmp_path / "one", tmp_path / "two"
    run(config(tiny_bert_dir, sentiment_csv, one, **settings))
    lorakit_train(*cli_args(tiny_bert_dir, sentiment_csv, two, **settings), "--nproc", "2")
    assert_same_adapter(one, two)
    assert json.loads((two / "run.json").read_text())["result"]["after"]["eval_accuracy"] == \
        json.loads((one / "run.json").read_text())["result"]["after"]["eval_accuracy"]


def test_plain_torchrun_as_two_machines(tiny_llama_dir, corpus_txt, one_process, tmp_path):
    """The README's several-machine command: two torchrun agents (one process each) meet at a c10d rendezvous;
    the run equals the one-process run."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-id", "test",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "lorakit", "train",
           *cli_args(tiny_llama_dir, corpus_txt, out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    assert_same_adapter(one_process, out)


def test_fsdp2_shard_trains_to_the_one_process_loss(tiny_llama_dir, corpus_txt, tmp_path):
    """Acceptance 2: FSDP2 (--shard) splits every weight of a tiny Llama over two processes: the same losses over 10
    steps (rtol 1e-4) and the same adapter; its checkpoint resumes on one process."""
    short = dict(steps=10, save_every=5, eval_every=5)
    one = tmp_path / "one"
    run(config(tiny_llama_dir, corpus_txt, one, **short))
    sharded = tmp_path / "sharded"
    lorakit_train(*cli_args(tiny_llama_dir, corpus_txt, sharded, **short), "--nproc", "2", "--shard")
    assert json.loads((sharded / "run.json").read_text())["sharded"] is True
    torch.testing.assert_close(train_losses(sharded), train_losses(one), rtol=1e-4, atol=0)
    assert_same_adapter(one, sharded)
    # the sharded run's checkpoint holds whole tensors: one process continues it
    resumed = resume_from(sharded, 5, tmp_path / "resumed")
    report = run(config(tiny_llama_dir, corpus_txt, resumed, resume=True, **short))
    assert report["result"]["resumed_from"].endswith("step-000005")
    assert_same_adapter(one, resumed)


def test_checkpoints_move_between_process_counts(tiny_llama_dir, corpus_txt, one_process, two_processes, tmp_path,
                                                 backend):
    """Acceptance 3: the two-process checkpoint at step 10 finishes on one process, and the one-process checkpoint
    on two; both end with the uninterrupted run's adapter."""
    two, _ = two_processes
    device = BACKENDS[backend]
    on_one = resume_from(two, 10, tmp_path / "two-then-one")
    report = run(config(tiny_llama_dir, corpus_txt, on_one, resume=True, device=device))
    assert report["result"]["resumed_from"].endswith("step-000010")
    assert_same_adapter(one_process, on_one)

    on_two = resume_from(one_process, 10, tmp_path / "one-then-two")
    lorakit_train(*cli_args(tiny_llama_dir, corpus_txt, on_two, quiet=False, resume=True, device=device), "--nproc", "2")
    assert json.loads((on_two / "run.json").read_text())["result"]["resumed_from"].endswith("step-000010")
    assert_same_adapter(one_process, on_two)


def test_sigterm_stops_every_process_with_a_checkpoint(tiny_llama_dir, corpus_txt, tmp_path):
    """SIGTERM to `lorakit train --nproc 2`: both processes stop after the same step, rank 0 checkpoints, exit 0, and
    the resume command keeps --nproc."""
    out = tmp_path / "run"
    args = cli_args(tiny_llama_dir, corpus_txt, out, steps=100000, save_every=100000, eval_every=100000, log_every=5)
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--nproc", "2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Resume with: lorakit train --nproc=2" in stderr
    found = ckpt.latest(out / "checkpoints")
    assert found is not None
    assert json.loads((out / "run.json").read_text())["result"]["stopped_at"] == found.step


def test_resume_command_of_a_launched_run_keeps_nproc(monkeypatch):
    monkeypatch.setenv("LORAKIT_LAUNCH_ARGV", "\x1f".join(["train", "--nproc=2", "--out", "my run"]))
    assert resume_command() == "lorakit train --nproc=2 --out 'my run' --resume"


@pytest.mark.parametrize("args,message", [
    (["--nproc", "2", "--batch-size", "7"], "--batch-size 7 is the global batch and must divide evenly among 2"),
    (["--nproc", "0"], "argument --nproc: 0 is not a positive integer"),
    (["--shard"], "--shard splits the model across processes, but this is one process"),
    (["--nproc", "2", "--shard", "--norm-cap", "1.0"], "--norm-cap cannot be used with --shard"),
    (["--nproc", "2", "--shard", "--backward", "celora"], "--backward celora cannot be used with --shard"),
    (["--nproc", "2", "--shard", "--bf16", "--device", "cpu"], "--bf16 on CPU keeps frozen weights in bf16"),
])
def test_bad_distributed_options_fail_before_anything_starts(tiny_llama_dir, corpus_txt, tmp_path, capsys, args, message):
    from lorakit.cli import main

    try:
        code = main(["train", "--model", tiny_llama_dir, "--data", corpus_txt, "--out", str(tmp_path), "--quiet", *args])
    except SystemExit as exc:  # argparse's own checks (--nproc 0)
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
