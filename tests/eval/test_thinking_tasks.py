"""eval/thinking_tasks.py: the generators' answers checked by an independent reading, the difficulty knobs, the
tick-count and halting switches, and a --quick run writing every requested arm per difficulty."""

import json

import numpy as np
import pytest
import thinking_tasks as tt  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import torch


def test_khop_answers_are_what_following_the_written_pairs_gives():
    task = tt.KHopTask(nodes=12, queries=8, max_hops=8)
    batch = task.sample(40, list(range(1, 9)), np.random.default_rng(0))
    assert batch["input_ids"].shape == (40, task.length) and batch["input_ids"].max() < task.vocab_size
    labelled = batch["labels"] != -100
    assert labelled.sum(1).tolist() == [8] * 40
    assert np.array_equal(batch["labels"][labelled].reshape(40, 8), task.answers_by_following(batch["input_ids"]))


def test_khop_difficulty_is_the_number_of_hops_and_no_fewer_hops_give_the_answer():
    task = tt.KHopTask(nodes=12, queries=8, max_hops=8)
    for k in (1, 3, 8):
        batch = task.sample(30, [k], np.random.default_rng(k))
        assert (batch["hops"] == k).all() and (task.difficulty(batch) == k).all()
        # the question token says k; rewriting it to j < k must change every answer (one cycle: f^j(x) != f^k(x))
        questions = batch["input_ids"][:, task.nodes + 1 :: 2]
        assert ((questions - task.query_base) // task.nodes == k - 1).all()
        for j in range(1, k):
            fewer = batch["input_ids"].copy()
            fewer[:, task.nodes + 1 :: 2] = questions - (k - j) * task.nodes
            assert (task.answers_by_following(fewer) != task.answers_by_following(batch["input_ids"])).all()


def test_the_curriculum_unlocks_hops_in_order_and_keeps_the_rows_in_that_order():
    task = tt.KHopTask(nodes=8, queries=4, max_hops=4)
    settings = tt.Settings(train_hops=3, curriculum=True)
    rows = tt.training_rows(task, settings, 30, seed=0)
    ids = np.asarray(rows["input_ids"])
    questions = ids[:, task.nodes + 1 :: 2]
    hops = (questions - task.query_base) // task.nodes + 1
    assert (hops[:10] == 1).all() and hops[10:20].max() == 2 and hops[20:].max() == 3 and (hops[20:] == 3).any()
    flat = tt.training_rows(task, tt.Settings(train_hops=3), 30, seed=0)  # without it: all hops from the start
    assert (((np.asarray(flat["input_ids"])[:10, task.nodes + 1 :: 2] - task.query_base) // task.nodes) > 0).any()


def test_khop_refuses_more_hops_than_the_cycle_allows():
    with pytest.raises(ValueError, match="max_hops=12.*1 .. nodes - 1 = 11"):
        tt.KHopTask(nodes=12, max_hops=12)


def test_parity_labels_are_the_running_parity_and_buckets_cover_every_position():
    task = tt.ParityTask(length=20)
    batch = task.sample(5, np.random.default_rng(1))
    for bits, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        running = 0
        for t in range(task.length):
            running ^= bits[t]
            assert labels[t + 1] == 2 + running
        assert labels[0] == -100
    assert task.buckets == [8, 16, 32]
    level = task.difficulty(batch).reshape(5, task.length)[0]
    assert level[:8].tolist() == [8] * 8 and level[8:16].tolist() == [16] * 8 and level[16:].tolist() == [32] * 4


def test_thinking_time_changes_ticks_and_halting_and_restores_them():
    task = tt.KHopTask(nodes=6, queries=2, max_hops=3)
    settings = tt.Settings(hidden_size=32)
    model = tt.CTMForCausalLM(tt.ctm_config(task, settings, 2)).eval()
    ids = torch.as_tensor(task.sample(2, [1], np.random.default_rng(0))["input_ids"])
    for ticks, halt, expected in ((5, None, 5.0), (None, 0.0, 1.0), (None, None, 2.0)):
        counter = tt.TicksUsed()
        with tt.thinking_time(model, ticks=ticks, halt_threshold=halt), model.observing(counter):
            model(ids)
        assert counter.used.unique().tolist() == [expected]
    block = model.model.layers[-1].thinking
    assert (block.ticks, block.halt_threshold) == (2, None)


@pytest.mark.experiment
def test_quick_run_writes_accuracy_per_difficulty_for_every_arm(tmp_path):
    arms = "k1,k2,transformer_iso_params"
    tt.main(["--quick", "--out", str(tmp_path), "--tasks", "khop", "--arms", arms, "--steps", "3"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["arms"]["khop"]) == {"k1", "k2", "transformer_iso_params"}
    for entry in result["arms"]["khop"].values():
        assert list(entry["accuracy"]) == [str(k) for k in range(1, 9)]
        assert all(0 <= cell["mean"] <= 1 and cell["sd"] == 0.0 for cell in entry["accuracy"].values())
    assert result["arms"]["khop"]["transformer_iso_params"]["layers"] >= 1
    assert (tmp_path / "results.md").exists() and (tmp_path / "accuracy.png").exists()


@pytest.mark.experiment
def test_an_arm_that_reruns_an_untrained_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tt.main(["--quick", "--out", str(tmp_path), "--arms", "k1,halting"])
    assert "halting runs the k8 model, so it needs k8 in --arms too" in capsys.readouterr().err
