"""The subject x relation fact memory: facts under one shared surface context land in different slots, a re-told fact
is not doubled, an overwrite wins, the memory round-trips through disk exactly, bad options are refused by name."""

import pytest
import torch
from tiny import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LogitsProcessorList, PreTrainedTokenizerFast

from modeling_ctm.memory.contextual import ContextualConfig, ContextualLogitsProcessor, ContextualMemory


WORDS = """<pad> <unk> tom ben sam sister dog flat is called in the name of what his where anna kate rose rex max
paris rome ? . my , lives""".split()


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tokenizer):
    # layer 0 keys (the embeddings) make the subject key the same in every sentence, so the tests check the write and
    # the read, not a random model's context mixing
    return tiny_model(seed=3, vocab_size=len(WORDS), hidden_size=64, ctm_layers="none")


def encode(tokenizer, text):
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


def fresh(model, tokenizer, **options):
    config = ContextualConfig(layer=0, **options)
    calibration = encode(tokenizer, " ".join(WORDS[2:]))
    return ContextualMemory.for_model(model, calibration, config)


def tell(memory, model, tokenizer, subject, relation, value):
    ids = encode(tokenizer, f"{subject} {relation} is called {value} .")
    return memory.write(model, tokenizer, ids, subject_end=0, value_start=4)


@torch.no_grad()
def answer(memory, model, tokenizer, question, candidates):
    ids = encode(tokenizer, question)
    states = model(ids[None], output_hidden_states=True).hidden_states[memory.config.layer][0]
    bias = memory.logit_bias(tokenizer, ids, states)[-1]
    token = [tokenizer.convert_tokens_to_ids(c) for c in candidates]
    return bias[token]


CANDIDATES = ["anna", "kate", "rose", "rex", "max"]


def test_two_facts_under_one_surface_context_land_in_different_slots_and_are_both_recalled(model, tokenizer):
    memory = fresh(model, tokenizer)
    # every fact ends "... is called X": the token before the value is the same, the key is not
    first = tell(memory, model, tokenizer, "tom", "sister", "anna")
    second = tell(memory, model, tokenizer, "ben", "sister", "kate")
    third = tell(memory, model, tokenizer, "tom", "dog", "rex")
    # each write stored (nearly) a whole value: none found the other's slot already answering for its key
    for written in (first, second, third):
        assert written > 0.9
    for question, expected in (("what is tom sister called", "anna"), ("the name of ben sister", "kate"),
                               ("what is tom dog called", "rex")):  # fmt: skip
        bias = answer(memory, model, tokenizer, question, CANDIDATES)
        ranked = sorted(bias.tolist(), reverse=True)
        assert CANDIDATES[int(bias.argmax())] == expected, (question, bias)
        assert ranked[0] - ranked[1] > 5.0  # nats: far above rounding
    # a subject never told gets nothing
    torch.testing.assert_close(
        answer(memory, model, tokenizer, "what is sam sister called", CANDIDATES), torch.zeros(5), atol=1e-6, rtol=0
    )


def test_a_retold_fact_is_not_doubled(model, tokenizer):
    memory = fresh(model, tokenizer)
    tell(memory, model, tokenizer, "tom", "sister", "anna")
    once = answer(memory, model, tokenizer, "what is tom sister called", CANDIDATES)
    again = tell(memory, model, tokenizer, "tom", "sister", "anna")
    assert again < 1e-3  # the delta rule's error is already zero for this key
    twice = answer(memory, model, tokenizer, "what is tom sister called", CANDIDATES)
    torch.testing.assert_close(twice, once, atol=1e-3, rtol=1e-4)


def test_an_overwrite_wins(model, tokenizer):
    memory = fresh(model, tokenizer)
    tell(memory, model, tokenizer, "tom", "sister", "anna")
    tell(memory, model, tokenizer, "tom", "sister", "kate")
    bias = answer(memory, model, tokenizer, "what is tom sister called", CANDIDATES)
    assert CANDIDATES[int(bias.argmax())] == "kate"
    assert bias[1] - bias[0] > 5.0


def test_the_memory_round_trips_through_disk_exactly(model, tokenizer, tmp_path):
    memory = fresh(model, tokenizer, strength=7.5, subject_threshold=0.35)
    tell(memory, model, tokenizer, "tom", "sister", "anna")
    tell(memory, model, tokenizer, "ben", "dog", "max")
    memory.save(tmp_path / "brain")
    loaded = ContextualMemory.load(tmp_path / "brain", model)
    assert loaded.config == memory.config
    assert loaded.writes == memory.writes and loaded.subject_count == memory.subject_count
    for name in ("subjects", "relations", "coefficients", "subject_sum"):
        torch.testing.assert_close(getattr(loaded, name), getattr(memory, name), atol=0, rtol=0)
    for question in ("what is tom sister called", "ben dog"):
        torch.testing.assert_close(
            answer(loaded, model, tokenizer, question, CANDIDATES),
            answer(memory, model, tokenizer, question, CANDIDATES),
            atol=0,
            rtol=0,
        )
    # and the loaded memory keeps learning where the saved one stopped
    tell(loaded, model, tokenizer, "tom", "sister", "rose")
    assert CANDIDATES[int(answer(loaded, model, tokenizer, "tom sister", CANDIDATES).argmax())] == "rose"


def test_generate_reads_the_memory_through_the_logits_processor(model, tokenizer):
    memory = fresh(model, tokenizer)
    tell(memory, model, tokenizer, "tom", "sister", "anna")
    prompt = encode(tokenizer, "what is tom sister called")[None]
    processor = ContextualLogitsProcessor(memory, model, tokenizer, torch.ones(prompt.shape[1], dtype=torch.bool))
    out = model.generate(prompt, max_new_tokens=1, do_sample=False, logits_processor=LogitsProcessorList([processor]),
                         pad_token_id=0)  # fmt: skip
    assert tokenizer.convert_ids_to_tokens(int(out[0, -1])) == "anna"
    plain = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert tokenizer.convert_ids_to_tokens(int(plain[0, -1])) != "anna"  # the random model alone does not say it


@pytest.mark.parametrize(
    "field, value",
    [("layer", -1), ("subject_threshold", 1.0), ("relation_threshold", float("nan")), ("strength", 0),
     ("learning_rate", 1.5), ("capacity", 0), ("prior_weight", -1.0), ("value_temperature", 0.0)],
)  # fmt: skip
def test_bad_options_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"ContextualConfig.{field}="):
        ContextualConfig(**{field: value})


def test_unknown_fields_and_a_layer_past_the_model_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="ContextualConfig has no field 'strenght'"):
        ContextualConfig.from_dict({"strenght": 3.0})
    with pytest.raises(ValueError, match="ContextualConfig.layer=9"):
        ContextualMemory.for_model(model, encode(tokenizer, "tom"), ContextualConfig(layer=9))
    memory = fresh(model, tokenizer)
    with pytest.raises(ValueError, match="subject_end=3, value_start=2"):
        memory.write(model, tokenizer, encode(tokenizer, "tom sister is called anna"), subject_end=3, value_start=2)


def test_the_session_tells_scores_and_keeps_the_fact_memory_in_its_brain(model, tokenizer, tmp_path):
    from modeling_ctm.memory.session import CTMOnlineSession, OnlineConfig

    chunked = tiny_model(seed=3, vocab_size=len(WORDS), hidden_size=64, ctm_carry="chunk", ctm_chunk_size=4)
    calibration = encode(tokenizer, " ".join(WORDS[2:]))
    memory = ContextualMemory.for_model(chunked, calibration, ContextualConfig(layer=0))
    session = CTMOnlineSession(chunked, tokenizer, config=OnlineConfig(max_new_tokens=2), contextual=memory)
    never = session.score("what is tom sister called", ["anna", "kate"])["log_probs"]
    assert session.tell_fact("tom sister is called anna .", "tom", "anna") > 0.9
    told = session.score("what is tom sister called", ["anna", "kate"])["log_probs"]
    assert told[0] - told[1] > 5.0 and told[0] > never[0] + 1.0  # nats: the told value now takes (nearly) all
    with pytest.raises(ValueError, match="'bob' is not a word of message="):
        session.tell_fact("tom sister is called anna .", "bob", "anna")
    session.save(tmp_path / "brain")
    loaded = CTMOnlineSession.load(tmp_path / "brain")
    assert loaded.contextual is not None and loaded.contextual.writes == 1
    torch.testing.assert_close(loaded.contextual.coefficients, memory.coefficients, atol=0, rtol=0)
    again = loaded.score("what is tom sister called", ["anna", "kate"])["log_probs"]
    torch.testing.assert_close(again, told, atol=1e-6, rtol=0)
