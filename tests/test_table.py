"""The headline table (experiments/table): intervals, cells, and a whole build on a tiny model."""

import json

import pytest

from experiments.table import build
from tests.conftest import make_cfg
from tests.test_pipeline import BASE, threshold  # noqa: F401  (fixture)


def test_wilson_interval():
    lo, hi = build.wilson(4, 16)
    assert lo == pytest.approx(0.1018, abs=1e-3) and hi == pytest.approx(0.4950, abs=1e-3)
    assert build.wilson(0, 10)[0] == 0.0 and build.wilson(10, 10)[1] == 1.0
    assert build.wilson(0, 0) is None


def test_bootstrap_interval_brackets_the_mean():
    values = [0.0, 0.25, 0.5, 0.25, 1.0, 0.0]
    lo, hi = build.bootstrap(values, 2000, seed=0)
    assert lo < sum(values) / len(values) < hi and lo >= 0 and hi <= 1
    assert build.bootstrap([], 10, 0) is None


def test_cells_say_rate_count_and_interval():
    assert build.cell(build.rate(4, 16)) == "0.25 (4/16) [0.10, 0.49]"
    assert build.cell(build.rate(0, 0)) == "—"
    assert build.cell({"rate": 0.125, "n": 3, "ci": (0.0, 0.3)}) == "0.12 (n=3) [0.00, 0.30]"


@pytest.mark.slow
def test_table_builds_from_two_sets_on_a_tiny_model(tmp_path, threshold):  # noqa: F811
    """Two runs, the second reusing the first's refusal direction; a row per set with
    every rate a rate and the files the README shows."""
    overrides = [o for o in BASE if not o.startswith("data.max_eval")]
    cfg = make_cfg(
        [
            *overrides,
            f"judge.threshold={threshold}",
            "~table.sets.jailbreakbench",
            "~table.sets.harmbench_test",
            "~table.sets.advbench_heldout",
            "+table.sets.a={path: 'builtin:harmful/eval', n: 2, held_out: false}",
            "+table.sets.b={path: 'builtin:harmful/eval', n: 2, held_out: false}",
            "table.bootstrap=100",
        ],
        tmp_path,
        config="table",
    )
    path = build.build(cfg)
    rows = json.loads((tmp_path / "table.json").read_text())
    assert [r["set"] for r in rows] == ["a", "b"] and path.exists()
    assert (tmp_path / "table.png").exists() and (tmp_path / "table.csv").exists()
    for r in rows:
        assert r["n_prompts"] == 2 and r["baseline_refusal"]["n"] == 2
    # the second run read the first's direction instead of selecting its own
    settings = json.loads((tmp_path / "b" / "settings.json").read_text())
    assert settings["search.direction.load"] == str(tmp_path / "a" / "direction.pt")
    first = (tmp_path / "a" / "direction.json").read_text()
    assert (tmp_path / "b" / "direction.json").read_text() == first
