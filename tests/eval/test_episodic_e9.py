"""Mechanics of the E9 episodic warm-start experiment (eval/episodic_e9.py), on its --quick smoke run. The headline
numbers need the full run (`python eval/episodic_e9.py`)."""

import json
import math

import episodic_e9 as e9  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest
import torch
from helpers import assert_share_of


def test_conversations_stay_on_topic_and_carry_the_value():
    settings = e9.Settings(n_topics=5)
    topics = e9.make_topics(settings, 0)
    assert topics.shape == (5, settings.words_per_topic) and topics.min() >= settings.first_word
    generator = torch.Generator().manual_seed(0)
    topic_ids = torch.tensor([0, 1, 2, 3, 4, 0])
    stored, values = e9.conversations(settings, topics, topic_ids, generator, role="store")
    asked, _ = e9.conversations(settings, topics, topic_ids, generator, values=values, role="recall")
    L = settings.chunk_length
    assert ((stored == e9.STORE).sum(1) == 1).all()
    at = (stored == e9.STORE).long().argmax(1)
    assert torch.equal(stored[torch.arange(6), at + 1], values)
    assert (asked[:, L - 2] == e9.RECALL).all() and torch.equal(asked[:, L - 1], values)
    for row, topic in enumerate(topic_ids):
        words = set(topics[topic].tolist())
        assert set(asked[row, : L - 2].tolist()) <= words
        assert set(stored[row].tolist()) - {e9.STORE, int(values[row])} <= words
    assert settings.vocab_size == e9.FIRST_VALUE + settings.n_values + settings.n_words


@pytest.mark.slow
@pytest.mark.experiment
def test_quick_run_mechanics(tmp_path, capsys):
    e9.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# E9")
    assert set(result["arms"]) == {"recalled", "fresh", "wrong", "oracle", "forgotten"}
    for arm, row in result["arms"].items():
        assert arm in printed
        for metric in ("first_token_loss", "recall_accuracy", "recall_nll"):
            assert math.isfinite(row[f"{metric}_mean"]) and math.isfinite(row[f"{metric}_sd"])
        assert row["recall_accuracy_mean"] == pytest.approx(result["per_seed"][0]["arms"][arm]["recall_accuracy"])
        assert_share_of(row["recall_accuracy_mean"], result["settings"]["eval_sequences"])
    record = result["per_seed"][0]
    assert record["episodes_stored"] == result["settings"]["n_topics"] and record["distractors"] == 7
    assert record["queries"] == result["settings"]["n_topics"] * result["settings"]["queries_per_topic"]
    assert_share_of(record["retrieval_top1"], record["queries"])  # a share of the queries, top-1 among the stored
    if record["retrieval_top1_above_threshold"] > 0:  # a correctly recalled state is the oracle's, exactly
        assert record["recalled_vs_oracle_max_abs_on_correct"] == 0.0
    cost = result["cost"]
    assert cost["bytes_per_episode"]["gpu"] > cost["bytes_per_episode"]["tiny"] > 0
    assert cost["episodes_in_memory"] == 300 and cost["recall_ms_per_call"] > 0 and cost["store_ms_per_call"] > 0


def test_bytes_per_episode_counts_the_key_the_state_and_the_bookkeeping():
    config = e9.preset_config("tiny")
    memory = e9.CTMEpisodicMemory.for_model(config, capacity=3)
    D, M, S_out, S_action = 128, 8, 64, 32
    floats = D + D + D * M + 2 * S_out + 2 * S_action  # key, state, trace, four accumulators
    assert memory.bytes_per_episode == 4 * floats + 1 + 3 * 8  # + occupied, last_used, stored_at, merges
