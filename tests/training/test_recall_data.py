"""MQAR recall rows: every query is answered with its own fact's value, and the share knob holds."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset

from modeling_ctm.training.data import PACKED_FEATURES, mix_recall_rows, recall_rows, recall_vocabulary


def test_every_answer_is_the_value_its_key_was_given_in_the_facts():
    keys, values = recall_vocabulary(40, first_id=2)
    assert keys.tolist() == list(range(2, 21)) and values.tolist() == list(range(21, 40))
    rows = recall_rows(5, 2 * 24 + 10, 6, keys, values, seed=0)  # two whole episodes and a cut third
    checked = 0
    for ids, answers in zip(rows["input_ids"], rows["answer_mask"]):
        assert len(ids) == 58 and set(ids) <= set(range(2, 40))
        for start in range(0, len(ids), 24):
            episode, marks = ids[start : start + 24], answers[start : start + 24]
            facts = dict(zip(episode[0:12:2], episode[1:12:2]))
            assert len(facts) == min(6, len(episode) // 2)  # the cut episode holds 5 facts
            assert set(facts) <= set(keys) and set(facts.values()) <= set(values)
            for position in np.flatnonzero(marks):
                assert position >= 13 and position % 2 == 1  # the value of a query, never a fact
                assert episode[position] == facts[episode[position - 1]]
                checked += 1
            if len(episode) == 24:
                assert sorted(episode[12::2]) == sorted(facts)  # every key is asked once
                assert sum(marks) == 6
    assert checked == 5 * (6 + 6 + 0)  # the cut episode ends inside its facts: nothing to score there
    again = recall_rows(5, 58, 6, keys, values, seed=0)
    assert again["input_ids"] == rows["input_ids"]
    assert recall_rows(5, 58, 6, keys, values, seed=1)["input_ids"] != rows["input_ids"]


def test_recall_rows_refuse_bad_settings():
    keys, values = recall_vocabulary(20)
    with pytest.raises(ValueError, match="n_pairs"):
        recall_rows(1, 8, 11, keys, values, seed=0)
    with pytest.raises(ValueError, match="disjoint"):
        recall_rows(1, 8, 2, keys, keys, seed=0)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.5])
def test_the_share_is_the_fraction_of_recall_rows_in_the_mixture(share):
    keys, values = recall_vocabulary(64, first_id=32)  # ids >= 32 are recall tokens, the blocks use 1..31
    length = 16
    block_ids = np.random.default_rng(0).integers(1, 32, (300, length))
    blocks = Dataset.from_dict(
        {"input_ids": block_ids, "attention_mask": np.ones_like(block_ids), "labels": block_ids},
        features=PACKED_FEATURES,
    )
    mixed = mix_recall_rows(blocks, share, 4, keys, values, seed=0)
    assert mixed.column_names == ["input_ids", "attention_mask", "labels"]
    is_recall = [min(ids) >= 32 for ids in mixed["input_ids"]]
    assert sum(not r for r in is_recall) == 300  # every block kept
    assert sum(is_recall) / len(mixed) == pytest.approx(share, abs=1 / len(mixed))
    if share:
        assert not all(is_recall[-sum(is_recall) :])  # shuffled in, not appended
    with pytest.raises(ValueError, match="share"):
        mix_recall_rows(blocks, 1.0, 4, keys, values, seed=0)


def test_mixed_recall_rows_can_put_their_loss_on_the_answers_only():
    keys, values = recall_vocabulary(64, first_id=32)
    block_ids = np.random.default_rng(0).integers(1, 32, (30, 16))
    blocks = Dataset.from_dict(
        {"input_ids": block_ids, "attention_mask": np.ones_like(block_ids), "labels": block_ids},
        features=PACKED_FEATURES,
    )
    mixed = mix_recall_rows(blocks, 0.25, 2, keys, values, seed=0, loss_on="answers")
    reference = recall_rows(10, 16, 2, keys, values, seed=0)  # the rows mix_recall_rows drew, in their order
    answers = {tuple(ids): mask for ids, mask in zip(reference["input_ids"], reference["answer_mask"])}
    for ids, labels in zip(mixed["input_ids"], mixed["labels"]):
        if tuple(ids) in answers:  # a recall row: the queried values and nothing else carry a loss
            assert labels == [t if a else -100 for t, a in zip(ids, answers[tuple(ids)])]
            assert any(a != -100 for a in labels)
        else:
            assert labels == ids  # the text keeps its loss on every token
    assert sum(tuple(ids) in answers for ids in mixed["input_ids"]) == 10
    with pytest.raises(ValueError, match="loss_on='values'"):
        mix_recall_rows(blocks, 0.25, 2, keys, values, seed=0, loss_on="values")


@pytest.mark.experiment
def test_recall_base_quick_run_writes_both_arms(tmp_path):
    import recall_base as script
    script.main(["--quick", "--steps", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["arms"]) == {"no_shift", "token_shift"}
    for arm in saved["arms"].values():
        assert 0.0 <= arm["recall_accuracy_mean"] <= 1.0 and arm["train_seconds_mean"] > 0
    assert "token_shift" in (tmp_path / "results.md").read_text()


def test_phase1_recall_share_mixes_recall_rows_into_phase_1_only():
    from modeling_ctm.training.run_data import Data, phase1_data
    from modeling_ctm.training.runs import load_preset
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=300)
    block_ids = np.random.default_rng(0).integers(5, len(tokenizer), (40, 16))
    blocks = Dataset.from_dict(
        {"input_ids": block_ids, "attention_mask": np.ones_like(block_ids), "labels": block_ids},
        features=PACKED_FEATURES,
    )
    data = Data(tokenizer, blocks, blocks, 4.0, 5.0, "blocks", "held out")
    shipped = load_preset("tiny")
    assert shipped.phase1.recall_share == 0.1 and shipped.phase1.recall_warmup.steps > 0
    assert phase1_data(load_preset("tiny", ["phase1.recall_warmup=null", "phase1.recall_share=0"]), data) is data
    preset = load_preset("tiny", ["phase1.recall_warmup=null", "phase1.recall_share=0.2", "phase1.recall_pairs=3"])
    mixed = phase1_data(preset, data)
    assert len(mixed.train) == 50 and mixed.eval is blocks and "20% of the rows in-context recall" in mixed.description
    special = set(tokenizer.all_special_ids)
    recall = [ids for ids in mixed.train["input_ids"] if ids not in block_ids.tolist()]
    assert len(recall) == 10 and not special & {i for ids in recall for i in ids}
    preset.phase1.recall_loss_on = "answers"
    assert "the loss on the answers" in phase1_data(preset, data).description
    with pytest.raises(ValueError, match="phase1.recall_loss_on='facts' is invalid: allowed values are"):
        load_preset("tiny", ["phase1.recall_loss_on=facts"])  # refused at load, before any training


class _Lookahead(torch.nn.Module):
    """A stand-in model whose logits at t name token t + 1 (it cheats), or a constant token."""

    def __init__(self, cheat: bool, vocab: int):
        super().__init__()
        self.cheat, self.vocab = cheat, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, use_cache=False):
        target = torch.roll(input_ids, -1, dims=1) if self.cheat else torch.zeros_like(input_ids)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float())


def test_recall_accuracy_scores_the_queried_values_only():
    from modeling_ctm.training.trainers import recall_accuracy

    keys, values = recall_vocabulary(40, first_id=2)
    rows = recall_rows(6, 32, 4, keys, values, seed=3)
    assert recall_accuracy(_Lookahead(True, 40), rows, batch=4) == 1.0
    assert recall_accuracy(_Lookahead(False, 40), rows) == 0.0  # id 0 is never a value
    with pytest.raises(ValueError, match="answer_mask"):
        recall_accuracy(_Lookahead(True, 40), rows.map(lambda r: {"answer_mask": [0] * len(r["answer_mask"])}))


def test_phase1_recall_tokens_limits_the_ids_of_recall_rows_and_the_held_out_ones():
    from modeling_ctm.training.run_data import held_out_recall_rows, recall_vocabulary_of
    from modeling_ctm.training.runs import load_preset
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=300)
    preset = load_preset("tiny")
    first = max(tokenizer.all_special_ids) + 1
    keys, values = recall_vocabulary_of(tokenizer, preset.phase1.recall_tokens)
    assert keys[0] == first and values[-1] == len(tokenizer) - 1  # default: every ordinary token
    preset = load_preset("tiny", ["phase1.recall_tokens=40"])
    keys, values = recall_vocabulary_of(tokenizer, preset.phase1.recall_tokens)
    assert len(keys) == len(values) == 20 and values[-1] == first + 39
    rows = held_out_recall_rows(preset, tokenizer)
    assert max(max(ids) for ids in rows["input_ids"]) <= first + 39 and len(rows) == 64
    for bad in (2, 10**6):
        with pytest.raises(ValueError, match=f"phase1.recall_tokens={bad} is invalid: allowed values are integers 4"):
            recall_vocabulary_of(tokenizer, bad)
    with pytest.raises(ValueError, match="phase1.recall_tokens='many' is invalid: allowed values are an integer"):
        load_preset("tiny", ["phase1.recall_tokens=many"])


def test_the_episodes_of_a_row_tell_distinct_keys_so_no_lookup_is_ambiguous():
    keys, values = recall_vocabulary(200, first_id=2)
    rows = recall_rows(8, 3 * 4 * 5, 5, keys, values, seed=1)  # three episodes of 5 facts per row
    for ids in np.asarray(rows["input_ids"]):
        told = np.concatenate([ids[e * 20 : e * 20 + 10 : 2] for e in range(3)])
        assert len(set(told.tolist())) == 15
    few = recall_rows(4, 3 * 4 * 5, 5, keys[:6], values, seed=1)  # 6 key ids cannot give 15 distinct keys
    assert np.array_equal(few["labels"], few["input_ids"])  # still built, keys may repeat across episodes


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (300, r"phase1.recall_warmup=300 is invalid: allowed values are a mapping \(RecallWarmupConfig\) or null"),
        ({"steps": 10, "lr": 1e-3}, r"phase1.recall_warmup.lr: unknown key; allowed keys are \['length', "),
        ({"steps": 0}, "phase1.recall_warmup.steps=0 is invalid: allowed values are integers >= 1"),
        ({"tokens": 128}, "phase1.recall_warmup.steps: missing; allowed values are an integer"),
        ({"steps": 5, "training": {"max_steps": 9}}, "phase1.recall_warmup.training.max_steps is invalid here"),
        ({"steps": 5, "training": {"learning_rat": 1}}, "phase1.recall_warmup.training.learning_rat: unknown key; did "
                                                         "you mean 'learning_rate'"),
        ({"steps": 5, "length": 39}, r"recall_warmup.length=39 is invalid: allowed values are integers 40 \.\. 128"),
        ({"steps": 5, "length": 129}, "phase1.recall_warmup.length=129 is invalid"),
        ({"steps": 5, "loss_on": "keys"}, r"recall_warmup.loss_on='keys' is invalid: allowed values are \['all', "),
    ],
)
def test_a_bad_recall_warmup_is_refused_at_load_naming_the_field(tmp_path, section, message):
    import yaml

    from modeling_ctm.training.recipe_config import load_raw_preset
    from modeling_ctm.training.runs import load_preset

    preset = load_raw_preset("tiny")
    preset["phase1"]["recall_warmup"] = section
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(preset))
    with pytest.raises(ValueError, match=message):
        load_preset(str(path))


def test_recall_warmup_rows_are_fresh_recall_rows_over_the_warmup_ids():
    from modeling_ctm.training.run_data import recall_warmup_rows
    from modeling_ctm.training.runs import load_preset
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=300)
    first = max(tokenizer.all_special_ids) + 1
    settings = ["phase1.recall_pairs=4", "phase1.recall_warmup={steps: 2, tokens: 40}"]
    preset = load_preset("tiny", settings)
    assert np.asarray(recall_warmup_rows(preset, tokenizer, 3)["input_ids"]).shape == (3, 128)  # default: block_size
    preset = load_preset("tiny", [*settings, "phase1.recall_warmup.length=16"])  # one episode of 4 facts
    rows = recall_warmup_rows(preset, tokenizer, 12)
    assert rows.column_names == ["input_ids", "attention_mask", "labels"] and len(rows) == 12
    ids = np.asarray(rows["input_ids"])
    assert ids.shape == (12, 16) and ids.min() >= first and ids.max() <= first + 39
    assert len({row.tobytes() for row in ids}) == 12  # every row its own facts
    assert rows["labels"] == rows["input_ids"]  # default: the loss covers every token, as in a data mixture
    preset.phase1.recall_warmup.loss_on = "answers"
    answers = recall_warmup_rows(preset, tokenizer, 12)
    assert answers["input_ids"] == rows["input_ids"]
    for ids_, labels in zip(answers["input_ids"], answers["labels"]):
        kept = [i for i, label in enumerate(labels) if label != -100]
        assert kept == [9, 11, 13, 15] and [labels[i] for i in kept] == [ids_[i] for i in kept]  # the queried values
    preset.phase1.recall_warmup.tokens = 2
    with pytest.raises(ValueError, match="phase1.recall_warmup.tokens=2 is invalid: allowed values are integers 4"):
        recall_warmup_rows(preset, tokenizer, 12)


def test_the_recall_warmup_trains_its_steps_on_recall_rows_at_its_own_rate_before_the_text(tmp_path):
    """Phase 1 of a micro run with a 3-step warm-up: the warm-up's Trainer runs 3 steps on recall rows at its own
    learning rate, then the main stage its 2 steps on the text at the phase's rate; a resumed phase 1 past the warm-up
    does not train it again and still reports it."""
    from tiny import micro_preset

    from modeling_ctm.training.phases import RECALL_WARMUP_FOLDER
    from modeling_ctm.training.runs import load_preset, prepare_data, run_phase

    preset = load_preset(str(micro_preset(tmp_path)), [
        "training.save_steps=1",
        "phase1.recall_pairs=4",  # a whole episode (16 tokens) fits the micro blocks (32)
        "phase1.recall_warmup={steps: 3, length: 16, tokens: 40, training: {learning_rate: 1.0e-4, "
        "lr_scheduler_type: constant}}",
    ])  # fmt: skip
    run_dir = tmp_path / "run"
    data = prepare_data(preset, run_dir)
    result = run_phase(1, preset, run_dir, data)
    assert result.steps == 2 and result.metrics["recall_warmup_steps"] == 3
    assert 0.0 <= result.metrics["recall_accuracy_after_warmup"] <= 1.0
    warmed = json.loads((run_dir / "phase1-language" / RECALL_WARMUP_FOLDER / "warmup_results.json").read_text())
    assert result.train_seconds > warmed["recall_warmup_seconds"] > 0 and "recall_warmup_seconds" not in result.metrics
    assert "first 3 steps on recall rows only at lr 0.0001" in (result.folder / "README.md").read_text()
    warmup_dir = run_dir / "phase1-language" / RECALL_WARMUP_FOLDER
    warmup = json.loads((warmup_dir / "checkpoint-3" / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in warmup["log_history"] if "learning_rate" in entry]
    assert warmup["global_step"] == 3 and rates == [1.0e-4] * 3
    main = json.loads((run_dir / "phase1-language" / "checkpoint-2" / "trainer_state.json").read_text())
    assert main["global_step"] == 2 and main["log_history"][0]["learning_rate"] != 1.0e-4
    resumed = run_phase(1, preset, run_dir, data, resume=True)
    assert resumed.metrics["recall_warmup_steps"] == 3
    assert not (warmup_dir / "checkpoint-4").exists()
