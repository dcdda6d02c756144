"""eval/edit_retention.py: the smoke run writes the experiment shape, and its positive control recalls every fact."""

import json

import edit_retention as script  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest


@pytest.mark.experiment
def test_quick_run_writes_every_arm_and_the_oracle_recalls_everything(tmp_path):
    script.main(["--quick", "--facts", "10", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    arms = result["arms"]
    assert set(script.ARMS) | set(script.KEY_ARMS) == set(arms)
    assert arms["oracle"]["recall_first10_at_10_mean"] == 1.0 and arms["oracle"]["recall_all_at_10_mean"] == 1.0
    assert arms["off"]["ce_cost_mean"] == 0.0  # no edit, no drift
    assert (tmp_path / "results.md").is_file() and (tmp_path / "retention.png").is_file()
