"""Mechanics of the E5 continuity experiment (eval/continuity_e5.py), on its --quick smoke run.

Only the mechanics are checked here (finite numbers, the table, the result files, and that each arm runs the path it
claims); the headline accuracies need the full run (`python eval/continuity_e5.py`)."""

import json
import math

import continuity_e5 as e5  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest
import torch
from helpers import assert_share_of

from modeling_ctm.cache_ctm import CTMCache


def test_sequences_place_store_value_and_recall():
    settings = e5.Settings(chunk_length=8, n_values=8)
    batch = e5.make_sequences(settings, 200, torch.Generator().manual_seed(0))
    ids, labels, values = batch["input_ids"], batch["labels"], batch["values"]
    L = settings.chunk_length
    assert ids.shape == labels.shape == (200, 2 * L)
    # exactly one STORE, in chunk 1, followed by the value; chunk 2 ends with RECALL v
    assert ((ids == e5.STORE).sum(1) == 1).all()
    store_at = (ids == e5.STORE).long().argmax(1)
    assert (store_at < L - 1).all()
    assert (ids[torch.arange(200), store_at + 1] == values).all()
    assert (ids[:, 2 * L - 2] == e5.RECALL).all() and (ids[:, 2 * L - 1] == values).all()
    # without distractors the value appears nowhere else; the only label is v after RECALL
    is_value = (ids >= e5.FIRST_VALUE) & (ids < e5.FIRST_VALUE + settings.n_values)
    assert (is_value.sum(1) == 2).all()
    assert ((labels != -100).sum(1) == 1).all() and (labels[:, -1] == values).all()
    assert ((values >= e5.FIRST_VALUE) & (values < e5.FIRST_VALUE + settings.n_values)).all()


@pytest.mark.slow
@pytest.mark.experiment
def test_quick_run_mechanics(tmp_path, capsys):
    e5.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for arm in ("A", "B", "C"):
        assert any(line.startswith(f"{arm} ") and "±" in line for line in printed.splitlines()), printed
    assert "chance" in printed

    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# E5")
    assert result["chance"] == pytest.approx(1 / result["settings"]["n_values"])
    for arm in ("A", "B", "C"):
        row = result["arms"][arm]
        # the arm's accuracy is its seed's: a share of the evaluation sequences
        assert row["accuracy_per_seed"] == [result["per_seed"][0][arm]["accuracy"]]
        assert row["accuracy_mean"] == pytest.approx(row["accuracy_per_seed"][0], abs=1e-12)
        assert_share_of(row["accuracy_mean"], result["settings"]["eval_sequences"])
        assert math.isfinite(row["accuracy_sd"]) and math.isfinite(row["recall_nll_mean"])
    record = result["per_seed"][0]
    assert all(math.isfinite(log["loss"]) for log in record["train_loss_w1"] + record["train_loss_w0"])

    checks = record["path_checks_w1_model"]
    assert checks["attention_entries_left_after_drop"] == 0  # the cut really drops self- and cross-attention KV
    assert checks["carry_vs_snapshot"] < 1e-5  # the carried path is the thinking state and nothing else
    assert checks["reset_vs_chunk2_alone"] < 1e-5  # arm B's chunk 2 is chunk 2 run alone
    assert checks["carry_vs_reset"] > 0  # after a few steps the CTM readout is no longer zero: the carry matters

    reach = record["gradient_reach_w1_model"]
    assert reach["chunk1_input_grad_norm_w0"] == 0.0  # detached: nothing of chunk 2's loss reaches chunk 1
    assert reach["chunk1_input_grad_norm_w1"] > 0.0
    assert reach["param_grad_rel_diff"] > 0.0


@pytest.mark.experiment
def test_reset_arm_uses_a_fresh_state():
    """The reset arm's chunk-2 logits equal chunk 2 run alone; the carry arm's differ once the readout is awake."""
    settings = e5.Settings(**e5.QUICK)
    torch.manual_seed(0)
    model = e5.CTMForCausalLM(e5.make_config(settings)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("out_proj.weight"):
                param.normal_(0.0, 0.3)  # a fresh block's readout is zero: wake it so the carried state shows
    ids = e5.make_sequences(settings, 8, torch.Generator().manual_seed(1))["input_ids"]
    L = settings.chunk_length
    with torch.no_grad():
        alone = model(input_ids=ids[:, L:], use_cache=False).logits
    torch.testing.assert_close(e5.chunk2_logits(model, ids, carry=False), alone)
    carried = e5.chunk2_logits(model, ids, carry=True)
    assert (carried - alone).abs().max() > 1e-3
    # the carried cache holds no attention KV after the cut
    with torch.no_grad():
        cache = model(input_ids=ids[:, :L], cache=CTMCache(model.config), use_cache=True).cache
    assert cache.get_seq_length() > 0
    cache.drop_attention_()
    assert cache.get_seq_length() == 0
