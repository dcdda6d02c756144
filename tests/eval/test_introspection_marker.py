"""eval/introspection_marker.py end to end on its --quick path (a chain model of a few steps, a fine-tune of a few):
every arm's metrics are written, the saved model carries its marker token and head. The headline numbers need the
full run (`python eval/introspection_marker.py --seeds 3 --models DIR`)."""

import json
import math

import introspection_marker as marker  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import numpy
import pytest

from modeling_ctm import CTMForCausalLM


def test_the_control_flags_as_many_answers_by_lowest_maxprob():
    wrong = numpy.array([False, True, True, False, True, False])
    marked = numpy.array([False, True, False, False, True, True])
    maxprob = numpy.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3])
    result = marker.arm_metrics(marked, wrong, maxprob, marked, 0.5, 0.5)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    # the three lowest max-probabilities: rows 1, 2 (wrong) and 5 (right)
    assert result["maxprob_precision"] == pytest.approx(2 / 3) and result["maxprob_recall"] == pytest.approx(2 / 3)
    assert result["flag_rate"] == pytest.approx(0.5) and result["agreement_with_head"] == 1.0


@pytest.mark.experiment
def test_quick_run_writes_every_arm_and_saves_a_model_that_writes_its_own_marker(tmp_path):
    marker.main(["--quick", "--out", str(tmp_path / "out"), "--save", str(tmp_path / "model")])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["arms"]) == {"rows", "lora", "twin", "head_rule"}
    for arm in saved["arms"].values():
        assert set(arm) == set(marker.METRICS)
        assert math.isfinite(arm["accuracy_after"]["mean"]) and math.isfinite(arm["flag_rate"]["mean"])
    model = CTMForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.ctm_unsure_token_id == model.config.vocab_size - 2 and model.confidence_head is not None
