"""Mechanics of the E16 online-learning experiment (eval/online_e16.py) on its --quick run. The headline numbers need
the full run (`python eval/online_e16.py --seeds 3`)."""

import json

import online_e16 as e16  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest
import torch
from online_base import base_model
from online_facts import Corpus, reading_rows, training_rows


@pytest.fixture(scope="module")
def tokenizer():
    return e16.fit_tokenizer(e16.Settings())  # every name and code one token (it checks)


def pad_filler(tokenizer):
    """A corpus whose filler text is a recognisable token: the pad token."""

    class Filler:
        @staticmethod
        def window(length, rng):
            return [tokenizer.pad_token_id] * length

    return Filler


@pytest.mark.parametrize("form", sorted(e16.FORMS))
def test_training_rows_target_only_the_asked_codes(tokenizer, form):
    settings = e16.Settings(facts=10, carry_share=0.4, context_share=0.4, chunk_length=80, fact_form=form)
    rows = training_rows(settings, tokenizer, pad_filler(tokenizer), 60, seed=0)
    pad, L = tokenizer.pad_token_id, settings.chunk_length
    codes = {tokenizer.convert_tokens_to_ids("Ġ" + c) for c in e16.CODES}
    kinds = set()
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        assert len(ids) == len(labels) == 2 * L
        if set(ids) == {pad}:  # filler text: every token is a target
            kinds.add("text")
            assert labels == ids
            continue
        # fact rows: only asked codes are targets, each the code the row told for that name
        targets = [(i, t) for i, t in enumerate(labels) if t != -100]
        assert targets and all(t in codes and ids[i] == t for i, t in targets)
        kinds.add("carry" if ids[L] != pad else "context")
        if ids[L] != pad:  # carry: chunk 2 asks every fact told in chunk 1
            assert len(targets) == settings.facts and all(i >= L for i, _ in targets)
    assert kinds == {"text", "carry", "context"}


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="facts=11"):
        e16.Settings(facts=11).validate()
    with pytest.raises(ValueError, match="distractors="):
        e16.Settings(distractors=[4, 0]).validate()
    with pytest.raises(ValueError, match="fact_form='prose'"):
        e16.Settings(fact_form="prose").validate()
    with pytest.raises(ValueError, match="neighbours="):
        e16.Settings(neighbours=55).validate()


@pytest.mark.slow
@pytest.mark.experiment
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


def test_reading_rows_tell_then_ask_every_fact_in_the_session_tokens(tokenizer):
    settings = e16.Settings(facts=4, reading_share=1.0, reading_loss_on="all")


    rows = reading_rows(settings, tokenizer, pad_filler(tokenizer), 20, seed=0)
    dot = tokenizer(".", add_special_tokens=False).input_ids
    names = {tokenizer(n, add_special_tokens=False).input_ids[0] for n in e16.NAMES}  # a message's first word
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        assert labels == ids  # every token a target
        sentences = [ids[i : i + 3] for i in range(0, 2 * 3 * settings.facts, 3)]
        told, asked = sentences[: settings.facts], sentences[settings.facts :]
        assert all(s[0] in names and s[2:] == dot for s in told)  # "NAME WORD." tokenized alone
        assert sorted(map(tuple, asked)) == sorted(map(tuple, told)) and len({s[0] for s in told}) == settings.facts


def test_reading_rows_with_the_loss_on_the_answers_target_exactly_the_asked_words(tokenizer):
    settings = e16.Settings(facts=4, reading_share=0.5, reading_loss_on="answers")


    rows = reading_rows(settings, tokenizer, pad_filler(tokenizer), 20, seed=0)
    facts_rows = 0
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        targets = [(i, label) for i, label in enumerate(labels) if label != -100]
        if not targets:  # a filler row: no loss at all under "answers"
            assert all(t == tokenizer.pad_token_id for t in ids)
            continue
        facts_rows += 1
        sentences = [ids[i : i + 3] for i in range(0, 2 * 3 * settings.facts, 3)]
        told = {s[0]: s[1] for s in sentences[: settings.facts]}
        asked = sentences[settings.facts :]
        # one target per asked sentence: its word, at its own position, which is what the name was told with
        assert [i for i, _ in targets] == [3 * (settings.facts + k) + 1 for k in range(settings.facts)]
        assert [label for _, label in targets] == [told[s[0]] for s in asked]
    assert 0 < facts_rows < 20


def test_a_base_dir_keeps_the_base_and_refuses_one_trained_otherwise(tmp_path, tokenizer):
    settings = e16.Settings(**e16.QUICK, base_dir=str(tmp_path))
    corpus = Corpus(tokenizer, settings)
    trained, log = base_model(settings, tokenizer, corpus, seed=0)
    assert {entry["stage"] for entry in log} == {"reader", "carry"} and trained.config.ctm_mlp == "keep"
    reused, reused_log = base_model(settings, tokenizer, corpus, seed=0)
    assert reused_log == log
    for (name, a), (_, b) in zip(trained.state_dict().items(), reused.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="reading_lr"):
        base_model(e16.Settings(**{**e16.QUICK, "reading_lr": 1e-2}, base_dir=str(tmp_path)), tokenizer, corpus, 0)
