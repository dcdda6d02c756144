"""Phase 4: the online session over `generate` (recall, carry, Hebbian edit, store, sleep) and the brain on disk."""

import pytest
import torch
from conftest import tiny_model

from modeling_ctm.memory.episodic import CTMEpisodicMemory
from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig
from modeling_ctm.memory.session import CTMOnlineSession, OnlineConfig
from modeling_ctm.memory.sleep import ConsolidationConfig, Consolidator, ReplayHeap
from modeling_ctm.training.tokenization import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat", "a dog ran in the park", "the code of Velmora is Quenth"] * 20
    return train_tokenizer(texts, vocab_size=300)


def _session(tokenizer, seed=0, **config):
    model = tiny_model(seed=seed, vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=4,
                       max_position_embeddings=256)  # fmt: skip
    memory = CTMEpisodicMemory.for_model(model.config, capacity=8)
    plasticity = HebbianPlasticity(model, PlasticityConfig())
    heap = ReplayHeap(capacity=4)
    consolidator = Consolidator(model, ConsolidationConfig(steps=1))
    options = {"max_new_tokens": 4, "sleep_every": 2, **config}
    return CTMOnlineSession(model, tokenizer, memory, plasticity, heap, consolidator, OnlineConfig(**options))


def test_a_conversation_carries_its_state_turn_to_turn_like_one_generate(tokenizer):
    session = _session(tokenizer, store=False)
    session.say("the cat sat")
    context = session.ids.shape[1] + len(tokenizer("on the mat", add_special_tokens=False).input_ids)
    session.say("on the mat")
    # both turns and the first reply as one context, recomputed without any cache: the same greedy reply
    recomputed = session.model.generate(session.ids[:, :context], max_new_tokens=4, do_sample=False, use_cache=False,
                                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert torch.equal(recomputed, session.ids)


def test_end_edits_stores_and_sleeps_and_the_next_conversation_recalls(tokenizer):
    session = _session(tokenizer)
    before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
    session.say("the code of Velmora is Quenth")
    first = session.end()
    assert first["episodes"] == 1 and not first["recalled"]
    assert first["plasticity"]["applied"], first["plasticity"]
    edited = [n for n, p in session.model.named_parameters() if not torch.equal(p, before[n])]
    assert edited and all("thinking" in n for n in edited)
    session.say("the code of Velmora is")
    second = session.end()
    assert second["recalled"] and session.recalls == 1
    assert "sleep" in second and second["sleep"]["consolidation_losses"]  # sleep_every=2
    assert session.conversations == 2


def test_the_brain_round_trips_exactly(tokenizer, tmp_path):
    session = _session(tokenizer)
    session.say("a dog ran in the park")
    session.end()
    session.save(tmp_path / "brain")
    loaded = CTMOnlineSession.load(tmp_path / "brain")
    assert (loaded.conversations, loaded.messages, loaded.recalls) == (1, 1, 0)
    assert len(loaded.memory) == 1 and len(loaded.heap) == 1
    for (name, a), (_, b) in zip(session.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert session.say("the dog ran") == loaded.say("the dog ran")
    ended, ended_loaded = session.end(), loaded.end()
    assert ended["recalled"] == ended_loaded["recalled"] and ended["plasticity"] == ended_loaded["plasticity"]
    assert ended["sleep"]["replay_ids"] == ended_loaded["sleep"]["replay_ids"]
    # the same Hebbian edit and the same sleep; the consolidation step of the reloaded AdamW agrees to float rounding
    # (measured max |diff| 4e-9), not bit for bit
    for (name, a), (_, b) in zip(session.model.state_dict().items(), loaded.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def _brain(session):
    """Everything score() must leave untouched: weights, memory buffers (recency included), counters."""
    tensors = {f"model.{k}": v.clone() for k, v in session.model.state_dict().items()}
    tensors.update({f"memory.{k}": v.clone() for k, v in session.memory.state_dict().items()})
    return tensors, (session.conversations, session.messages, session.recalls, len(session.heap))


def test_score_is_the_recalled_conversations_log_prob_and_changes_nothing(tokenizer):
    session = _session(tokenizer, sleep_every=None)
    session.say("the code of Velmora is Quenth")
    session.end()
    before, counters = _brain(session)
    prompt, candidates = "the code of Velmora is", [" Quenth", " the cat", " park"]
    scored = session.score(prompt, candidates)
    assert scored["recalled"]
    after, counters_after = _brain(session)
    assert counters_after == counters and all(torch.equal(before[k], after[k]) for k in before)
    # the same numbers from one uncached forward of prompt + candidate, started from the recalled state
    model = session.model
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    for candidate, log_prob, greedy in zip(candidates, scored["log_probs"], scored["greedy"]):
        target = tokenizer(candidate, return_tensors="pt", add_special_tokens=False).input_ids
        cache = session.memory.recall(model, ids, threshold=session.config.recall_threshold, mark_used=False)
        with torch.no_grad():
            logits = model(torch.cat([ids, target], 1), cache=cache, use_cache=True).logits[0, ids.shape[1] - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, target[0, :, None]).sum()
        torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-5)
        assert bool(greedy) == bool((logits.argmax(-1) == target[0]).all())
    fresh = _session(tokenizer)  # empty memory: nothing to recall, the learned start state
    assert not fresh.score(prompt, candidates)["recalled"]


@pytest.mark.parametrize("candidates", [[], "Quenth", [""], [" ok", 3]])
def test_score_refuses_bad_candidates_and_a_conversation_under_way(tokenizer, candidates):
    session = _session(tokenizer)
    with pytest.raises(ValueError, match="candidates="):
        session.score("the code of", candidates)
    session.say("the cat")
    with pytest.raises(ValueError, match="end\\(\\) the one under way"):
        session.score("the code of", [" Quenth"])


def test_two_sessions_do_not_leak_into_each_other(tokenizer):
    one, two = _session(tokenizer), _session(tokenizer)
    one.say("the code of Velmora is Quenth")
    one.end()
    assert len(two.memory) == 0 and two.conversations == 0
    reply_fresh = _session(tokenizer).say("a dog ran")
    assert two.say("a dog ran") == reply_fresh


@pytest.mark.parametrize(
    "message, match",
    [("", "message='' is invalid"), ("   ", "non-empty text"), ("the cat " * 200, "this conversation has room for")],
)
def test_bad_messages_are_refused_with_the_rule(tokenizer, message, match):
    with pytest.raises(ValueError, match=match):
        _session(tokenizer).say(message)


def test_bad_configuration_is_refused(tokenizer):
    with pytest.raises(ValueError, match="OnlineConfig.learn_rate=-1"):
        OnlineConfig(learn_rate=-1)
    with pytest.raises(ValueError, match="ctm_carry='chunk'"):
        CTMOnlineSession(tiny_model(vocab_size=len(tokenizer)), tokenizer)
    with pytest.raises(ValueError, match="end\\(\\) called with no conversation"):
        _session(tokenizer).end()


def test_learn_from_takes_one_anchored_step_per_message(tokenizer):
    session = _session(tokenizer, learn_rate=1e-2, store=False)
    ids = tokenizer("the code of Velmora is Quenth", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        before = session.model(ids, labels=ids).loss.item()
    session.say("the code of Velmora is Quenth")
    with torch.no_grad():
        after = session.model(ids, labels=ids).loss.item()
    assert after < before


def test_the_guide_phase4_example_runs(tokenizer, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()
    section = text.split("## Phase 4: a model that remembers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    model = tiny_model(vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=4, max_position_embeddings=256)
    namespace = {"model": model, "tokenizer": tokenizer}
    exec(compile(code, "docs/guide.md phase 4", "exec"), namespace)
    assert namespace["report"]["episodes"] == 1 and (tmp_path / "my-brain" / "session.json").is_file()
    assert namespace["session"].conversations == 1
