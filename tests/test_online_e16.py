"""Mechanics of the E16 online-learning experiment (eval/online_e16.py) on its --quick run. The headline numbers need
the full run (`python eval/online_e16.py --seeds 3`)."""

import json
from pathlib import Path

import pytest

from modeling_ctm.experiments import load_script
from modeling_ctm.tokenization import train_tokenizer


e16 = load_script(Path(__file__).parents[1] / "eval" / "online_e16.py")


@pytest.fixture(scope="module")
def tokenizer():
    sentences = [e16.statement(name, code) for name in e16.NAMES for code in e16.CODES[:3]] + ["So Emma's code is"]
    return train_tokenizer(sentences * 3, vocab_size=400)


def test_training_rows_tell_the_facts_of_training_names_only(tokenizer):
    settings = e16.Settings(facts=4, carry_share=0.5, context_share=0.5, chunk_length=96)

    class Text:  # the corpus' filler: a recognisable token
        stream = None

        @staticmethod
        def window(length, rng):
            return [tokenizer.pad_token_id] * length

    rows = e16.training_rows(settings, tokenizer, Text, 40, seed=0)
    evaluation = {tokenizer.convert_tokens_to_ids("Ġ" + n) for n in e16.NAMES[settings.train_names :]}
    for ids in rows["input_ids"]:
        assert len(ids) == 2 * settings.chunk_length
        assert not evaluation & set(ids)  # names the evaluation asks about never appear in training
    # a carry row tells its facts in chunk 1 and asks them in chunk 2; a context row does both in chunk 1
    carry = [ids for ids in rows["input_ids"] if ids[settings.chunk_length] != tokenizer.pad_token_id]
    assert carry and all(
        ids[: settings.chunk_length].count(tokenizer.pad_token_id) < settings.chunk_length for ids in carry
    )


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="facts=11"):
        e16.Settings(facts=11).validate()
    with pytest.raises(ValueError, match="distractors="):
        e16.Settings(distractors=[4, 0]).validate()
    with pytest.raises(ValueError, match="train_names="):
        e16.Settings(train_names=55).validate()


@pytest.mark.slow
def test_quick_run_writes_every_arm_and_the_controls_hold(tmp_path):
    assert e16.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["arms"]) == set(e16.ARMS)
    assert (tmp_path / "results.md").read_text().startswith("# E16")
    assert (tmp_path / "retention.png").stat().st_size > 0
    ns = [str(n) for n in result["settings"]["distractors"]]
    for arm in e16.ARMS:
        assert set(result["retention"][arm]) == set(ns)
        for metric in e16.METRICS:
            assert f"{metric}_mean" in result["arms"][arm]
    seed = result["per_seed"][0]
    for arm in ("off", "episodic", "rag", "oracle"):  # nothing in these arms changes a weight
        assert all(seed[f"{arm}@{n}"]["ce_cost"] == 0.0 for n in ns), arm
    for arm in ("hebbian", "learn_from", "all"):  # these do
        assert seed[f"{arm}@{ns[-1]}"]["ce_cost"] != 0.0, arm
    assert seed["off"]["neighbourhood"] == 1.0  # the reference answers are the off arm's own
    assert seed["episodic@0"]["recalled"] == 1.0  # the only episode is conversation 1: every question recalls it
    assert result["cost"]["all"]["bytes_held"] > result["cost"]["episodic"]["bytes_held"] > 0
