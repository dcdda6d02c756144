"""Mechanics of the E7/E12 plasticity experiment (eval/plasticity_e7.py) on its --quick smoke run: the files, every
arm, the controls at the same norm, the off arm exactly zero, the stability run inside its band. The headline numbers
need the full run (`python eval/plasticity_e7.py`)."""

import json
import math

import plasticity_e7 as e7  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest


@pytest.mark.experiment
def test_quick_run_writes_every_arm_and_holds_the_band(tmp_path, capsys):
    assert e7.main(["--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["arms"]) == {"off", "gated", "ungated", "random", "sgd"}
    for arm, row in result["arms"].items():
        for metric in ("delta_ce_p", "delta_ce_u", "fact_recall"):
            assert math.isfinite(row[f"{metric}_mean"]) and math.isfinite(row[f"{metric}_sd"]), (arm, metric)
    assert result["arms"]["off"]["delta_ce_p_mean"] == 0.0 and result["arms"]["off"]["delta_ce_u_mean"] == 0.0
    seed = result["per_seed"][0]
    assert seed["edit_norm"] and all(n > 0 for n in seed["edit_norm"].values())
    stability = result["stability"]
    assert stability["inside_band"] and stability["nan_or_skipped"] == 0
    assert stability["edits_applied"] == stability["edits"] == e7.QUICK["stability_edits"]
    assert result["cost"]["ms_per_token_on"] > 0 and result["cost"]["memory_held_bytes"] > 0
    assert (tmp_path / "stability.png").stat().st_size > 0
    assert "| gated |" in (tmp_path / "results.md").read_text()
    for bad, says in ((["--seeds", "0"], "--seeds 0 is invalid"), (["--set", "nope=1"], "unknown field 'nope'")):
        with pytest.raises(SystemExit):  # a usage error of the harness's parser, naming the field
            e7.main(["--quick", "--out", str(tmp_path), *bad])
        assert says in capsys.readouterr().err
