"""Mechanics of the E10/E11 sleep experiment (eval/sleep_e10.py) on its --quick smoke run: every arm ran, the numbers
are finite, the sleeping arms really slept and consolidated, and the result files follow the experiment shape. The
headline numbers need the full run (`python eval/sleep_e10.py`)."""

import json
import math

import pytest
import sleep_e10 as e10  # eval/ is on the path (pyproject.toml: pytest pythonpath)


@pytest.mark.slow
@pytest.mark.experiment
def test_quick_run_writes_every_arm_and_both_settings(tmp_path):
    results = e10.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "results.json").read_text())
    assert set(stored["arms"]) == {"plain", "sleep", "extra_steps", "uniform"}
    for arm, entry in stored["arms"].items():
        for metric in ("s1_held_out_ce", "s1_hard_ce", "s1_ece", "s2_final_mean_ce", "s2_forgetting"):
            assert math.isfinite(entry[metric]["mean"]), (arm, metric)
    (row,) = results["per_seed"]["setting1"]
    assert row["e11"]["sleeps"] == 2 and row["n_hard"] > 0
    assert all(len(losses) == 2 and all(x > 0 for x in losses) for losses in row["cost"]["consolidation_losses"])
    assert 0 < row["cost"]["share_asleep"] < 1 and row["cost"]["heap_memory_bytes"] > 0
    assert row["e11"]["stale"]["outlier_replays"] == row["e11"]["sleeps"]  # the stale greedy heap relives it
    (row2,) = results["per_seed"]["setting2"]
    assert len(row2["arms"]["sleep"]["retention"]) == 3 and len(row2["arms"]["sleep"]["retention"][0]) == 3
    # the sleeping arms changed the weights beyond plain training
    assert row["arms"]["sleep"]["held_out_ce"] != row["arms"]["plain"]["held_out_ce"]
    text = (tmp_path / "results.md").read_text()
    assert "Setting 1" in text and "Setting 2" in text and "E11" in text and "(control)" in text
