import csv

import pytest

from lorakit.errors import ConfigError
from lorakit.reproduce import expressive as rx


def test_quick_reproductions_show_the_papers_shape(tmp_path):
    logs = []
    results = rx.run(tmp_path, rx.EXPERIMENTS, rx.Budget.quick(), log=logs.append)
    d = 8
    lin = [r for r in results["linear"] if r["frozen"] == "random"]
    assert lin[-1]["rank"] == d // 2 and lin[-1]["construction_mse"] < 1e-20  # exact at R = D / L
    assert all(r["construction_mse"] <= r["gd_mse"] * 1.001 for r in lin)  # the optimum is a lower bound for GD
    fnn = [r for r in results["fnn"] if r["frozen_depth"] == 2]
    assert fnn[-1]["construction_mse"] < 1e-15 < fnn[-1]["gd_mse"]
    tfn = [r for r in results["tfn"] if r["depth"] == 1]
    assert tfn[d // 2 - 1]["construction_mse"] < 1e-15 < tfn[d // 2 - 2]["construction_mse"]
    assert tfn[d // 2 - 1]["gd_mse"] > 1e-6  # gradient descent does not find the exact adapter
    depth = results["depth"]
    exact = [r for r in depth if r["required_rank"] is not None]
    assert exact and all(r["required_rank"] == r["theory_ceil_D_over_L"] for r in exact)
    assert [r["theory_ceil_D_over_L"] for r in depth] == sorted((r["theory_ceil_D_over_L"] for r in depth), reverse=True)
    for name in rx.EXPERIMENTS:
        rows = list(csv.DictReader(open(tmp_path / f"{name}.csv")))
        assert rows and (tmp_path / f"{name}.png").stat().st_size > 5000


def test_unknown_experiment():
    with pytest.raises(ConfigError, match="unknown experiment"):
        rx.run("/tmp/unused", ("lineaar",))
