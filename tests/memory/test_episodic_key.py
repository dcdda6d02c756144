"""Episodic keys: every key function stores and finds episodes, and the centred input embedding
finds the conversation that contains a one-word question among 16 stored ones where the mean embedding cannot."""

import pytest
import torch
from tiny import tiny_model

from modeling_ctm.memory.episodic import KEY_FUNCTIONS, CTMEpisodicMemory


NAMES = list(range(1, 17))  # one "name" token per conversation
FILLER = list(range(40, 97))


def toy_conversations(seed=0, length=16):
    """16 conversations of filler tokens, each mentioning its own name three times; the question is the name alone.
    (A bag of words in 32 dimensions: a longer text or a rarer name drowns in the other words' directions.)"""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name in NAMES:
        ids = torch.tensor(FILLER)[torch.randint(len(FILLER), (length,), generator=generator)]
        ids[2], ids[7], ids[12] = name, name, name
        rows.append(ids)
    return torch.stack(rows)


def shared_direction_model():
    """Embeddings that share one direction, as trained embeddings do (random ones share none)."""
    model = tiny_model(ctm_layers="last")
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table += 5 * table.norm(dim=-1).mean() * torch.nn.functional.normalize(torch.randn(table.shape[1]), dim=0)
    return model


def top1(model, key_function):
    memory = CTMEpisodicMemory.for_model(model.config, capacity=len(NAMES), key_function=key_function)
    conversations = toy_conversations()
    with torch.no_grad():
        cache = model(conversations, use_cache=True).cache
    memory.store(model, conversations, cache)
    _, slots = memory.search(model, torch.tensor(NAMES)[:, None])
    return (slots == torch.arange(len(NAMES))).float().mean().item()


def test_centred_input_embedding_finds_the_conversation_of_a_one_word_question():
    model = shared_direction_model()
    centred, plain = top1(model, "centered_input_embedding"), top1(model, "mean_input_embedding")
    assert centred == 1.0
    assert plain < centred  # the shared direction swamps the plain mean's ranking


@pytest.mark.parametrize("key_function", sorted(KEY_FUNCTIONS))
def test_every_key_function_stores_and_finds_its_own_episodes(key_function):
    model = tiny_model(ctm_layers="last")
    memory = CTMEpisodicMemory.for_model(model.config, capacity=4, key_function=key_function)
    ids = toy_conversations()[:4]
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    slots = memory.store(model, ids, cache)
    scores, found = memory.search(model, ids)  # the stored texts themselves
    assert found.tolist() == slots.tolist() and torch.allclose(scores, torch.ones(4), atol=1e-5)
    padded = torch.cat([torch.zeros(4, 3, dtype=ids.dtype), ids], 1)  # left padding does not move a key
    mask = torch.cat([torch.zeros(4, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    _, found_padded = memory.search(model, padded, mask)
    assert found_padded.tolist() == slots.tolist()


def test_a_hidden_state_key_does_not_feed_the_plasticity_observers():
    from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig

    model = tiny_model(ctm_layers="last")
    rule = HebbianPlasticity(model, PlasticityConfig()).enable()
    memory = CTMEpisodicMemory.for_model(model.config, capacity=2, key_function="last_hidden_state")
    memory.search(model, toy_conversations()[:2])
    assert rule.statistics().abs().sum() == 0 and len(model.model.tick_observers) == 1
    rule.disable()


def test_token_set_takes_its_own_key_size_and_other_keys_refuse_one():
    model = tiny_model(ctm_layers="last")
    memory = CTMEpisodicMemory.for_model(model.config, capacity=16, key_function="token_set", key_size=512)
    conversations = toy_conversations()
    with torch.no_grad():
        cache = model(conversations, use_cache=True).cache
    memory.store(model, conversations, cache)
    _, slots = memory.search(model, torch.tensor(NAMES)[:, None])
    assert (slots == torch.arange(len(NAMES))).all()  # lexical: found whatever the embeddings are
    with pytest.raises(ValueError, match="key_size"):
        CTMEpisodicMemory.for_model(model.config, capacity=2, key_function="mean_input_embedding", key_size=512)
