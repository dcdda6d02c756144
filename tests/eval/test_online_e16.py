"""Mechanics of the E16 online-learning experiment (eval/online_e16.py) on its --quick run. The headline numbers need
the full run (`python eval/online_e16.py --seeds 3`)."""

import json

import online_e16 as e16  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import pytest


@pytest.fixture(scope="module")
def tokenizer():
    return e16.fit_tokenizer(e16.Settings())  # every name and code one token (it checks)


@pytest.mark.parametrize("form", sorted(e16.FORMS))
def test_training_rows_target_only_the_asked_codes(tokenizer, form):
    settings = e16.Settings(facts=10, carry_share=0.4, context_share=0.4, chunk_length=80, fact_form=form)

    class Filler:  # the corpus' filler: a recognisable token
        @staticmethod
        def window(length, rng):
            return [tokenizer.pad_token_id] * length

    rows = e16.training_rows(settings, tokenizer, Filler, 60, seed=0)
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
