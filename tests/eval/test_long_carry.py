"""eval/long_carry.py: the measure sees beta grow without bound when nothing forgets (its control), sees it settle when
the accumulators forget, and the script writes the experiment shape for a saved phase-3 checkpoint."""

import json

import long_carry as script  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest
import torch
from tiny import micro_preset, tiny_model


def carried_model(**overrides):
    return tiny_model(ctm_layers="last", ctm_carry="chunk", ctm_chunk_size=4, ctm_sync_seed="zero",
                      ctm_decay_init_range=[0.5, 1.0], **overrides)  # fmt: skip


def test_beta_settles_when_the_accumulators_forget_and_grows_by_k_per_chunk_when_they_do_not():
    model = carried_model()
    ids = torch.randint(1, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    settings = script.Settings(tokens=64, trained_tokens=16)
    forgetting = script.measure_window(model, ids, settings)
    control = script.measure_window(script.without_forgetting(model), ids, settings)
    (layer,) = model.config.ctm_layer_indices
    grows = torch.tensor(control["beta_by_chunk"][f"layer{layer}"])
    assert torch.allclose(grows[2:] - grows[1:-1], torch.tensor(3.0))  # r = 1: every tick adds 1, K = 3 a chunk
    settles = torch.tensor(forgetting["beta_by_chunk"][f"layer{layer}"])
    assert settles.max() < 1 / (1 - torch.exp(torch.tensor(-0.5))) + 1e-4  # below the geometric bound 1 / (1 - r_max)
    assert (settles[-4:] - settles[-5:-1]).abs().max() < 1e-3  # and settled
    arms = script.summarize([{"seed": 0, "as_trained": forgetting, "no_forgetting": control}])
    checks = {arm: script.verdicts(arms[arm], [layer]) for arm in script.ARMS}
    assert checks["as_trained"][f"layer{layer}"]["beta_bounded"]
    assert not checks["no_forgetting"][f"layer{layer}"]["beta_bounded"]


def test_halting_counts_the_ticks_each_token_ran():
    model = carried_model()
    ids = torch.randint(1, 97, (1, 32), generator=torch.Generator().manual_seed(1))
    script.set_halting(model, 0.0)  # everything settles after tick 0: one tick each
    records, ce = script.read_long(model, ids)
    assert torch.equal(records[1]["ticks"], torch.ones(32)) and ce.shape == (31,)
    script.set_halting(model, None)
    records, _ = script.read_long(model, ids)
    assert torch.equal(records[1]["ticks"], torch.full((32,), 3.0))


@pytest.mark.experiment
def test_quick_run_writes_both_arms_and_the_criteria(tmp_path):
    folder = tmp_path / "phase3"
    carried_model(vocab_size=512).save_pretrained(folder)  # the micro preset's tokenizer
    preset = micro_preset(tmp_path)  # 4 held-out blocks of 32 tokens
    script.main(["--quick", "--model", str(folder), "--set", f"preset={preset}", "--set", "tokens=96",
                 "--set", "trained_tokens=32", "--out", str(tmp_path / "out")])  # fmt: skip
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(result["arms"]) == set(script.ARMS)
    assert set(result["arms"]["as_trained"]) == {"trained", "beyond", "halting"}
    assert result["criteria"]["no_forgetting"]["layer1"]["beta_bounded"] is False
    assert (tmp_path / "out" / "results.md").is_file()
