"""Issue 33, acceptance point 2: every malformed input of tests/attacks/attacks.py is refused with one
`lorakit: error:` line, or works and checks out; none ends in a traceback or a silently wrong result.

One test for the whole table (tiny models, built once; about 70 s on 2 cores). To see which attack failed and
why, run `python tests/attacks/attacks.py -v` (or `--only COMMAND`, `-k TEXT`)."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks  # noqa: E402


def test_no_traceback_and_nothing_silently_wrong():
    t0 = time.perf_counter()
    results = attacks.run_attacks()
    elapsed = time.perf_counter() - t0
    assert len(results) == len(attacks.ATTACKS)
    bad = attacks.failures(results)
    if bad:
        pytest.fail(f"{len(bad)} of {len(results)} attacks failed ({elapsed:.0f} s):\n{attacks.table(results)}\n\n"
                    + attacks.report(results, verdicts=attacks.FAILING), pytrace=False)
