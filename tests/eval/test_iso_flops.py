"""eval/iso_flops_e14.py: its measurements (repetition, interpolation, held-out CE, FLOPs of each arm) and the --quick
run's results."""

import json
import math

import iso_flops_e14 as e14  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest
import torch
from tiny import TINY, tiny_model


def test_repeated_ngram_fraction_counts_earlier_occurrences():
    assert e14.repeated_ngram_fraction([1, 2, 3, 4, 5, 6]) == 0.0
    assert e14.repeated_ngram_fraction([7] * 10) == 6 / 7  # 7 four-grams, all but the first repeat
    # 1 2 3 4 | 1 2 3 4: grams 1234, 2341, 3412, 4123, 1234 -> one repeat of five
    assert e14.repeated_ngram_fraction([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert e14.repeated_ngram_fraction([1, 2, 3]) == 0.0


def test_interpolation_and_the_equal_budgets():
    assert e14.interpolate([0, 10, 20], [6.0, 5.0, 4.0], 15) == pytest.approx(4.5)
    assert e14.interpolate([0, 10, 20], [6.0, 5.0, 4.0], 20) == 4.0
    with pytest.raises(ValueError, match="outside"):
        e14.interpolate([0, 10], [6.0, 5.0], 11)

    def curve(flops_per_step, seconds_per_step, ces):
        return {
            "curve": [
                {"training_flops": i * flops_per_step, "train_seconds": i * seconds_per_step, "ce": ce}
                for i, ce in enumerate(ces)
            ]
        }

    costs = {
        "mlp_4l": (1.0, 1.0),
        "ctm_4l_all_k2": (2.0, 3.0),
        "ctm_2l_all_k4": (3.0, 4.0),
        "ctm_4l_last_k2": (1.5, 2.0),
    }
    record = {arm: curve(*costs[arm], [6.0, 5.0, 4.0]) for arm in e14.ARMS}
    budget, walls = e14.compare([record])
    assert budget == 2.0 and walls == [2.0]  # the cheapest arm's end, in FLOPs and in seconds
    assert record["mlp_4l"]["ce_at_equal_flops"] == 4.0
    assert record["ctm_4l_all_k2"]["ce_at_equal_flops"] == pytest.approx(5.0)  # 2 FLOPs = its first step
    assert record["ctm_2l_all_k4"]["ce_at_equal_flops"] == pytest.approx(6.0 - 2 / 3)
    assert record["ctm_4l_all_k2"]["ce_at_equal_wall"] == pytest.approx(6.0 - 2 / 3)


def test_held_out_ce_is_the_served_readout_loss():
    ids = torch.randint(1, TINY["vocab_size"], (3, 10))
    for overrides in ({"ctm_layers": "none"}, {"ctm_layers": "last", "ctm_readout": "tick_mixture"}):
        model = tiny_model(**overrides)
        ce = e14.held_out_ce(model, ids, batch=2)
        out = model(ids, labels=ids)
        expected = out.loss if overrides["ctm_layers"] == "none" else out.loss_tick_mixture
        assert ce == pytest.approx(expected.item(), rel=1e-5)


def test_arm_shapes_and_their_flops():
    class Tokenizer:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return 512

    settings = e14.Settings(**e14.QUICK)
    configs = {arm: settings.config(arm, Tokenizer()) for arm in e14.ARMS}
    assert configs["mlp_4l"].ctm_layer_indices == []
    assert configs["ctm_4l_all_k2"].ctm_layer_indices == [0, 1, 2, 3] and configs["ctm_4l_all_k2"].ctm_ticks == 2
    assert configs["ctm_2l_all_k4"].ctm_layer_indices == [0, 1] and configs["ctm_2l_all_k4"].ctm_ticks == 4
    assert configs["ctm_4l_last_k2"].ctm_layer_indices == [3]
    cost = {arm: e14.training_flops_per_token(config, settings) for arm, config in configs.items()}
    assert cost["mlp_4l"] < cost["ctm_4l_last_k2"] < cost["ctm_4l_all_k2"]
    assert cost["ctm_4l_all_k2"] == e14.flops.ctm_flops(configs["ctm_4l_all_k2"], settings.block_size)["training"]


@pytest.mark.slow
@pytest.mark.experiment
def test_quick_run_writes_every_arm(tmp_path):
    result = e14.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["arms"]) == set(e14.ARMS)
    for arm in saved["arms"].values():
        for metric in ("final_ce", "ce_at_equal_flops", "ce_at_equal_wall", "repetition_4gram"):
            assert math.isfinite(arm[f"{metric}_mean"]) and arm[f"{metric}_sd"] >= 0
            assert len(arm[f"{metric}_per_seed"]) == 2
    for name, arm in saved["arms"].items():  # the summary is the seeds' mean of what each seed measured
        seeds = [record[name]["repetition_4gram"] for record in saved["per_seed"]]
        assert arm["repetition_4gram_per_seed"] == pytest.approx(seeds, abs=1e-12)
        assert arm["repetition_4gram_mean"] == pytest.approx(sum(seeds) / 2, abs=1e-12)
    # every arm saw the same tokens; the cheapest one's end is the equal-FLOPs budget
    ends = [record[arm]["curve"][-1] for record in saved["per_seed"] for arm in e14.ARMS]
    assert len({end["tokens"] for end in ends}) == 1
    assert saved["flop_budget"] == min(end["training_flops"] for end in ends)
    cheapest = min(e14.ARMS, key=lambda a: saved["arms"][a]["flops_per_token_training_mean"])
    assert saved["arms"][cheapest]["ce_at_equal_flops_mean"] == pytest.approx(saved["arms"][cheapest]["final_ce_mean"])
    assert saved["answer"].startswith("At equal training FLOPs") and result["answer"] == saved["answer"]
    text = (tmp_path / "results.md").read_text()
    assert "±" in text and "ctm_2l_all_k4" in text and "foreign_load" in text
    assert (tmp_path / "ce_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
