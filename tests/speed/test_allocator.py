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
