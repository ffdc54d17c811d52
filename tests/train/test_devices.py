"""Devices and processes on a machine with GPUs, checked on a CPU: torch.cuda's answers are faked (is_available,
device_count), so what would fail on a first GPU run fails here, in one `lorakit: error:` line."""

from __future__ import annotations

import pytest
import torch

from conftest import refused
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_more_gpu_processes_than_gpus_are_refused_before_any_starts(monkeypatch, capsys, tiny_llama_dir, corpus_txt,
                                                                    tmp_path):
    gpus(monkeypatch, 2)
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda n, argv: launched.append(n) or 0)
    base = ["train", "--model", tiny_llama_dir, "--data", corpus_txt, "--out", tmp_path / "run", "--quiet"]
    refused(capsys, *base, "--nproc", "4", needle="4 processes on this machine's 2 CUDA device(s)")
    refused(capsys, *base, "--nproc", "2", "--device", "cuda:1", needle="each process trains on its own GPU")
    assert launched == [] and not (tmp_path / "run").exists()
    # on the CPU (gloo) any number of processes may run; two processes on two GPUs are launched
    from lorakit.cli import main

    assert main([*map(str, base), "--nproc", "4", "--device", "cpu"]) == 0
    assert main([*map(str, base), "--nproc", "2"]) == 0
    assert launched == [4, 2]


def test_a_torchrun_worker_without_its_gpu_stops_in_one_line(monkeypatch):
    gpus(monkeypatch, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(distributed.ConfigError, match="2 processes on this machine's 1 CUDA device"):
        distributed.from_environment()


def test_a_checkpoint_of_more_gpus_resumes_on_fewer(monkeypatch):
    """The RNG states of the GPUs a checkpoint's processes saw: a resume on fewer GPUs restores those it has."""
    state = ckpt.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    gpus(monkeypatch, 1)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((device, int(s[0]))))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("sets one state per saved GPU"))
    ckpt.set_rng_state(state)
    assert restored == [(0, 0)]


@pytest.mark.parametrize("command", [["eval", "--adapter", "A"], ["merge", "--adapter", "A", "--out", "M"],
                                     ["generate", "--adapter", "A", "--prompt", "hi"], ["bench", "--steps", "1"]])
def test_cuda_asked_where_there_is_none_is_one_line(monkeypatch, capsys, command):
    gpus(monkeypatch, 0)
    refused(capsys, *command, "--device", "cuda", needle="CUDA is not available on this machine; use --device cpu")


def test_eval_and_generate_run_where_device_says_cuda_by_default(monkeypatch):
    """Without --device they load onto the GPU when there is one (here faked: the load is intercepted)."""
    from lorakit.train import apply
    from lorakit.train.config import resolve_device

    gpus(monkeypatch, 1)
    assert resolve_device(None) == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    seen = []

    class Loaded(Exception):
        pass

    def load_model(spec, task, **kw):
        seen.append(kw["device"])
        raise Loaded

    monkeypatch.setattr(apply, "load_model", load_model)
    monkeypatch.setattr(apply, "adapter_chat_template", lambda adapter, template: (None, None))
    with pytest.raises(Loaded):
        apply.load_for_generation(None, "builtin:smollm2", device=resolve_device(None))
    assert seen == [torch.device("cuda")]


def test_the_benchmark_autocasts_and_times_on_the_models_device(monkeypatch):
    """The bench's contenders autocast on their model's device type (a GPU's bf16 autocast, not the CPU's)."""
    from lorakit.bench import versus_peft as vp

    model = torch.nn.Linear(2, 2, device="meta")
    runner = vp.Runner("peft bf16 autocast", model, [], 1e-3, bf16_autocast=True)
    calls = []
    monkeypatch.setattr(vp.torch, "autocast", lambda device_type, **kw: calls.append((device_type, kw["enabled"])))
    runner.autocast()
    assert runner.device.type == "meta" and calls == [("meta", True)]
