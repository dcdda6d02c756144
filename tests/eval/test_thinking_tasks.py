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


def test_chain_answers_are_the_roots_reached_by_following_the_written_pairs():
    task = tt.ChainTask(nodes=15, chains=3, queries=8)
    assert task.max_hops == 4
    batch = task.sample(40, [1, 2, 3, 4], np.random.default_rng(0))
    ids = batch["input_ids"]
    assert ids.shape == (40, task.length) and ids.max() < task.vocab_size
    keys, values = ids[:, : 2 * task.nodes : 2], ids[:, 1 : 2 * task.nodes : 2]
    assert ((keys >= task.key_base) & (keys < task.value_base)).all()
    assert ((values >= task.value_base) & (values < task.answer_base)).all()
    assert all(sorted(row) == list(range(task.nodes)) for row in (keys - task.key_base).tolist())  # every node once
    labelled = batch["labels"] != -100
    answers, distances = task.follow(ids)
    assert np.array_equal(batch["labels"][labelled].reshape(40, 8), answers)
    assert np.array_equal(distances, batch["hops"]) and np.array_equal(task.difficulty(batch), distances.reshape(-1))
    # exactly `chains` roots per row (self-loops), and every answer is one of them
    loops = (keys - task.key_base) == (values - task.value_base)
    assert (loops.sum(1) == 3).all()
    # scored: the first time a start node is asked in its row (a repeat could copy the earlier answer)
    starts = ids[:, 2 * task.nodes + 1 :: 2].tolist()
    first = [[x not in row[:q] for q, x in enumerate(row)] for row in starts]
    assert np.array_equal(batch["scored"], np.array(first)) and not batch["scored"].all() and batch["scored"][:, 0].all()


def test_chain_difficulty_is_the_distance_and_more_hops_than_needed_stay_on_the_root():
    task = tt.ChainTask(nodes=20, chains=4, queries=4)
    for k in (1, 2, 4):
        batch = task.sample(20, [k], np.random.default_rng(k))
        ids = batch["input_ids"]
        assert (batch["hops"] == k).all() and (task.difficulty(batch) == k).all()
        parent = [
            {
                a - task.key_base: b - task.value_base
                for a, b in zip(row[: 2 * task.nodes : 2], row[1 : 2 * task.nodes : 2])
            }
            for row in ids.tolist()
        ]
        starts = ids[:, 2 * task.nodes + 1 :: 2] - task.key_base
        roots = batch["labels"][batch["labels"] != -100].reshape(20, 4) - task.answer_base
        for r in range(20):
            for q in range(4):
                node = starts[r, q]
                for hop in range(1, task.max_hops + 3):
                    node = parent[r][node]
                    assert (node == roots[r, q]) == (hop >= k)  # fewer hops miss the root, more stay on it


def test_chain_refuses_a_split_that_leaves_no_hop_and_distances_it_cannot_have():
    with pytest.raises(ValueError, match="chains must divide nodes"):
        tt.ChainTask(nodes=10, chains=3)
    with pytest.raises(ValueError, match="distances to a root are 1 .. 4"):
        tt.ChainTask(nodes=15, chains=3).sample(2, [5], np.random.default_rng(0))


def test_the_last_tick_readout_follows_the_ticks_actually_run():
    """`ctm_readout="last"` reads the last tick the block ran, also when `thinking_time` runs another tick count."""
    task = tt.ChainTask(nodes=6, chains=2, queries=2)
    config = tt.ctm_config(task, tt.Settings(hidden_size=32, n_synch_out=16), 4)
    config.ctm_readout = "last"
    model = tt.CTMForCausalLM(config).eval()
    ids = torch.as_tensor(task.sample(2, [1], np.random.default_rng(0))["input_ids"])
    for ticks in (1, 4, 8):
        with tt.thinking_time(model, ticks=ticks), torch.no_grad():
            out = model(ids)
        assert (out.selected_tick == ticks - 1).all()


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
        assert all(cell["sd"] == 0.0 for cell in entry["accuracy"].values())
    for arm, entry in result["arms"]["khop"].items():  # one seed: each difficulty's mean is that seed's accuracy
        seed = result["per_seed"]["khop"][0][arm]["accuracy"]
        assert {k: cell["mean"] for k, cell in entry["accuracy"].items()} == pytest.approx(seed, abs=1e-12)
        answers = result["settings"]["eval_rows"] * tt.KHopTask.queries  # every row asks `queries` questions
        assert all(abs(value * answers - round(value * answers)) < 1e-6 for value in seed.values()), seed
    assert result["arms"]["khop"]["transformer_iso_params"]["layers"] >= 1
    assert (tmp_path / "results.md").exists() and (tmp_path / "accuracy.png").exists()


@pytest.mark.experiment
def test_an_arm_that_reruns_an_untrained_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tt.main(["--quick", "--out", str(tmp_path), "--arms", "k1,halting"])
    assert "halting runs the k4 model, so it needs k4 in --arms too" in capsys.readouterr().err
