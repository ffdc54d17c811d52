import csv
import json

import pytest

from lorakit.bench.poly_bench import loglog_slope
from lorakit.reproduce import limits as rl


def test_gradient_error_grows_with_the_logit_bound_and_falls_with_the_degree():
    small, large = rl.gradient_errors(128, 0.3, 2, head_dim=4), rl.gradient_errors(128, 3.0, 2, head_dim=4)
    assert small["grad"] < 1e-2 < large["grad"]
    assert rl.gradient_errors(128, 1.0, 4, head_dim=4)["grad"] < rl.gradient_errors(128, 1.0, 2, head_dim=4)["grad"]
    assert small["out"] <= small["certified_out_bound"]


def test_loglog_slope_is_the_exponent_of_a_power_law():
    lengths = [64, 128, 256, 512]
    assert loglog_slope(lengths, [3e-4 * n for n in lengths]) == pytest.approx(1.0)
    assert loglog_slope(lengths, [1e-6 * n**2 for n in lengths]) == pytest.approx(2.0)


def test_phase_transition_quick(tmp_path):
    result = rl.phase_transition(tmp_path, rl.PhaseBudget.quick(), log=lambda m: None)
    for length in (64, 256):
        errs = [r["grad"] for r in result["errors"] if r["length"] == length]
        assert errs == sorted(errs)  # error grows with G / sqrt(log L)
    for curve in result["timing"]["curves"]:  # what was timed is recorded (the timings themselves are the bench's)
        assert [r["length"] for r in curve["rows"]] == sorted({r["length"] for r in curve["rows"]})
        assert all(r["poly_s"] > 0 and r["sdpa_s"] > 0 for r in curve["rows"])
        assert curve["slope_poly"] == pytest.approx(loglog_slope([r["length"] for r in curve["rows"]],
                                                                 [r["poly_s"] for r in curve["rows"]]))
    rows = list(csv.DictReader(open(tmp_path / "phase_transition.csv")))
    assert len(rows) == len(result["errors"])
    assert json.loads((tmp_path / "phase_transition.json").read_text())["reading"]
    assert (tmp_path / "phase_transition.png").stat().st_size > 5000


@pytest.mark.real_model
def test_norm_speed_quick(tmp_path):
    result = rl.norm_speed(tmp_path, rl.SpeedBudget.quick(), log=lambda m: None)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["standard", "norm-controlled"] * 2
    for std, ctl in zip(rows[::2], rows[1::2]):
        assert std["logit_bound_before"] == pytest.approx(20.0, rel=1e-2)
        assert ctl["logit_bound_before"] == pytest.approx(0.12, rel=1e-2)
        assert ctl["logit_bound_after"] < 1.0  # the cap kept the adapters from undoing the control
    assert "how_made" in result and "does not show" in result["reading"]
    assert (tmp_path / "norm_speed.png").stat().st_size > 5000 and (tmp_path / "norm_speed.csv").exists()
