"""Freed tensors go back to the system (speed.allocator): glibc's fixed mmap threshold, set by attach/quantize/load."""

import os
import subprocess
import sys
import textwrap

import pytest

# A layer-by-layer pattern: a 40 MB temporary freed (glibc then raises its threshold to 40 MB), then 2 MB temporaries
# each followed by a small tensor that stays (as a checkpointed layer keeps its input): with the dynamic threshold
# the 2 MB blocks come from the heap, whose top the live tensors pin, so the freed blocks stay resident.
PATTERN = textwrap.dedent("""
    import sys, torch
    {setup}
    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
    big = torch.ones(10 * 2**20); del big
    before = rss_mib()
    kept = []
    for _ in range(100):
        tmp = torch.ones(2**19)                    # 2 MB, freed at once
        kept.append(torch.ones(16))                # a small tensor that stays
        del tmp
    print(rss_mib() - before, {fixed})
""")


def _grown_mib(setup: str, fixed: str = "None", env: dict | None = None) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", PATTERN.format(setup=setup, fixed=fixed)], capture_output=True,
                         text=True, check=True, env={**os.environ, **(env or {})}).stdout.split()
    return float(out[0]), out[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_fixed_threshold_gives_freed_blocks_back():
    grown_dynamic, _ = _grown_mib("")
    grown_fixed, fixed = _grown_mib("from lorakit.speed.allocator import return_freed_memory_to_the_system as f; r = f()",
                                    fixed="r")
    assert fixed == "True"
    assert grown_dynamic > 150, grown_dynamic  # the effect this fixes: 100 freed 2 MB blocks stay resident
    assert grown_fixed < 20, grown_fixed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_attach_and_load_fix_it_and_a_users_setting_is_kept():
    attach = ("import lorakit, torch.nn as nn; from lorakit.speed import allocator\n"
              "m = nn.Sequential(nn.Linear(8, 8)); lorakit.attach(m, lorakit.LoraConfig(r=2, targets=['0']))\n"
              "r = allocator._FIXED")
    assert _grown_mib(attach, fixed="r")[1] == "True"
    users = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}
    assert _grown_mib(attach, fixed="r", env=users)[1] == "False"  # a threshold the user set is theirs to keep
    load = ("from lorakit.train.models import load_model; from lorakit.speed import allocator\n"
            "load_model('builtin:smollm2', 'causal-lm', dtype='int8'); r = allocator._FIXED")
    assert _grown_mib(load, fixed="r")[1] == "True"


# Freed blocks reused (speed.allocator.reuse_freed_blocks, block_cache.cpp): a 4 MB tensor allocated, written and
# freed 50 times, as a layer's temporaries are; minor page faults counted around the loop.
REUSE = textwrap.dedent("""
    import resource, sys, torch
    from lorakit.speed import allocator
    installed = allocator.reuse_freed_blocks({limit})
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocator.return_freed_memory_to_the_system()
    torch.ones(2**20)  # warm
    f0 = faults()
    for i in range(50):
        t = torch.empty(2**20)                     # 4 MB: a fresh mmap each time without the cache
        t.fill_(float(i))
        assert t[-1].item() == i and t.sum().item() == i * 2**20
        del t
    f1 = faults()
    sizes = [torch.empty(2**20 + k * 2**16) for k in range(40)]  # 40 different sizes, 4-6.5 MB each, all freed
    del sizes
    print(installed, f1 - f0, allocator.block_cache_stats())
""")


def _reuse(limit: str = "None", env: dict | None = None) -> tuple[bool, int, dict | None]:
    out = subprocess.run([sys.executable, "-c", REUSE.format(limit=limit)], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})}).stdout
    installed, faults, stats = out.split(" ", 2)
    return installed == "True", int(faults), eval(stats)  # (a dict or None, printed by the child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_without_page_faults_and_the_held_bytes_are_bounded():
    installed, faults, stats = _reuse(limit=str(16 << 20))
    if not installed:
        pytest.skip("no C++ compiler here: PyTorch keeps its own allocator")
    plain, plain_faults, plain_stats = _reuse(env={"LORAKIT_BLOCK_CACHE_MIB": "0"})
    assert not plain and plain_stats is None
    assert plain_faults > 50 * 500, plain_faults  # each 4 MB block faulted in again (1024 pages)
    assert faults < 2000, faults                   # reused: mapped once
    assert stats["hits"] >= 49 and stats["held"] <= 16 << 20  # 40 freed blocks of ~5 MB, at most 16 MiB kept


TRAIN = textwrap.dedent("""
    import lorakit, torch, torch.nn as nn
    from lorakit.speed import allocator
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))  # 4 MB activations: cached sizes
    lorakit.attach(m, lorakit.LoraConfig(r=2, targets=["0", "2"]))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(1024, 1024)
    for _ in range(3):
        loss = m(x).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
    print(allocator.block_cache_stats() is not None, repr(loss.item()))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_attach_installs_it_the_losses_are_the_same_and_lorakit_native_0_keeps_pytorchs():
    done = [subprocess.run([sys.executable, "-c", TRAIN], capture_output=True, text=True, check=True,
                           env={**os.environ, **env}).stdout.split()
            for env in ({}, {"LORAKIT_NATIVE": "0"}, {"LORAKIT_BLOCK_CACHE_MIB": "0"})]
    if done[0][0] == "False":
        pytest.skip("no C++ compiler here: PyTorch keeps its own allocator")
    assert [d[0] for d in done] == ["True", "False", "False"]
    assert done[0][1] == done[1][1] == done[2][1]  # the same bits of the loss after 3 steps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_negative_limit_holds_nothing():
    code = ("import torch; from lorakit.speed import allocator\n"
            "print(allocator.reuse_freed_blocks(-1), end=' ')\n"
            "for _ in range(5): t = torch.empty(2**20); del t\n"
            "print(allocator.block_cache_stats())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    installed, stats = out.split(" ", 1)
    assert installed == "False"
    assert eval(stats) is None or eval(stats)["held"] == 0  # (None: no C++ compiler here)


def test_a_block_cache_size_that_is_not_a_number_is_one_error_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "row {i} of some text"}}\n' for i in range(8)))
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", "builtin:smollm2", "--data", str(data),
                           "--task", "causal-lm", "--steps", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "LORAKIT_BLOCK_CACHE_MIB": "256M"})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("lorakit: error: LORAKIT_BLOCK_CACHE_MIB='256M' is not")
    assert not (tmp_path / "out").exists()  # refused before the run claimed its output or loaded the model
