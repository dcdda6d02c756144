"""Mechanics of eval/introspection.py: the metric helpers on known inputs, and the --quick smoke run end to end
(files, keys, finite numbers). The headline numbers need the full run (`python eval/introspection.py`)."""

import json
import math
from pathlib import Path

import introspection as intro  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import numpy
import pytest
import torch
from tiny import tiny_model


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    correct = numpy.array([1, 1, 1, 0] * 25, dtype=float)
    ece, table = intro.expected_calibration_error(numpy.full(100, 0.75), correct, 10)
    assert ece == pytest.approx(0.0) and table == [{"bin": 7, "count": 100, "confidence": 0.75, "accuracy": 0.75}]
    ece, _ = intro.expected_calibration_error(numpy.full(100, 0.95), correct, 10)
    assert ece == pytest.approx(0.2)


def test_halt_counter_and_fixed_ticks_reach_the_model():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 6))
    intro.set_halt_threshold(model, 0.0)  # everyone stops after tick 0: 2 of 3 ticks skipped
    with model.observing(intro.HaltCounter()) as counter:
        halted = intro.readout_ce(model, ids)
    assert counter.skipped == 2 * counter.ran
    intro.set_halt_threshold(model, None)
    intro.set_ticks(model, 1)
    assert intro.readout_ce(model, ids) == pytest.approx(halted, abs=1e-5)
    intro.set_ticks(model, 3)


@pytest.mark.experiment
def test_quick_run_writes_results_and_pictures(tmp_path):
    results = intro.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("arms", "ece", "auroc", "halting_curve", "fixed_ticks_curve", "per_seed", "settings"):
        assert key in saved
    assert set(saved["ece"]) == {"ctm_certainty", "ctm_maxprob", "phase1_maxprob"}
    assert {"logits_only_lr", "logits_plus_sync_lr", "ctm_certainty"} <= set(saved["auroc"])
    for point in saved["halting_curve"]:
        assert 0 <= point["tick_flops_saved"]["mean"] <= 2 / 3 + 1e-9 and math.isfinite(point["delta_ce"]["mean"])
    assert [p["ticks"] for p in saved["fixed_ticks_curve"]] == [1, 2]
    assert (tmp_path / "results.md").read_text().startswith("# Introspection")
    for picture in results["pictures"]:
        assert Path(picture).read_bytes()[:4] == b"\x89PNG"
    assert any("fmri_hard" in p for p in results["pictures"]) and any("reliability" in p for p in results["pictures"])
