"""Carried thinking state: forward, chunked calls and cached generate compute one function (DESIGN semantics 1-3)."""

import pytest
import torch
from tiny import tiny_model
from transformers import PreTrainedTokenizerFast, pipeline

from modeling_ctm import CTMCache
from modeling_ctm.training.tokenization import train_tokenizer


CARRIES = [
    pytest.param(dict(ctm_carry="none"), id="none"),
    pytest.param(dict(ctm_carry="chunk", ctm_chunk_size=1), id="chunk1"),
    pytest.param(dict(ctm_carry="chunk", ctm_chunk_size=3), id="chunk3"),
]
GREEDY = dict(do_sample=False, pad_token_id=0)


def _ids(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode_one_by_one(model, ids, prompt_length, **kwargs):
    """Prefill `prompt_length` tokens, then feed the rest one token per call through the returned cache."""
    out = model(ids[:, :prompt_length], use_cache=True, **kwargs)
    logits, certainty, cache = [out.logits], [out.certainty], out.cache
    for t in range(prompt_length, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        certainty.append(out.certainty)
        cache = out.cache
    return torch.cat(logits, 1), torch.cat(certainty, 1), cache


@pytest.mark.parametrize("carry", CARRIES)
@pytest.mark.parametrize("ticks", [1, 3])
@pytest.mark.parametrize("prompt_length", [1, 5])
def test_incremental_decoding_equals_the_full_forward(carry, ticks, prompt_length):
    model = tiny_model(ctm_ticks=ticks, ctm_readout="last", **carry)
    ids = _ids(2, 11)  # 11 and the prompt lengths are not multiples of the chunk size 3
    with torch.no_grad():
        full = model(ids, use_cache=False)
        logits, certainty, _ = _decode_one_by_one(model, ids, prompt_length)
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(certainty, full.certainty, rtol=0, atol=1e-5)


@pytest.mark.parametrize("carry", CARRIES)
def test_most_certain_readout_agrees_wherever_the_choice_is_clear(carry):
    """The most-certain readout is an argmax over ticks; near-ties may flip by float rounding, clear choices may not."""
    model = tiny_model(ctm_readout="most_certain", **carry)
    with torch.no_grad():  # louder ticks, so that the ticks' certainties differ visibly
        for layer in model.model.layers:
            layer.thinking.out_proj.weight.mul_(30.0)
        model.lm_head.weight.mul_(3.0)
    ids = _ids(2, 11)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        logits, certainty, _ = _decode_one_by_one(model, ids, 4)
    torch.testing.assert_close(certainty, full.certainty, rtol=0, atol=1e-5)
    top2 = full.certainty.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert clear.float().mean() > 0.3
    torch.testing.assert_close(logits[clear], full.logits[clear], rtol=0, atol=1e-5)


@pytest.mark.parametrize("carry", CARRIES)
def test_any_split_into_calls_equals_one_call(carry):
    model = tiny_model(ctm_readout="last", **carry)
    ids = _ids(2, 13)
    with torch.no_grad():
        full = model(ids).logits
        for cut in (2, 4, 7):
            first = model(ids[:, :cut], use_cache=True)
            second = model(ids[:, cut:], cache=first.cache, use_cache=True)
            torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=0, atol=1e-5)


def test_carry_rule_chunks_start_from_the_last_token_of_the_previous_chunk():
    """With C = 3, tokens 3, 4, 5 all start from the state after token 2: changing token 4 cannot touch token 3 or 5's
    entry state, and changing token 1 reaches every later chunk only through the carried state."""
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=3, ctm_layers="last", num_hidden_layers=1, ctm_readout="last")
    ids = _ids(1, 9)
    with torch.no_grad():
        _, base = model.probe(ids)
        changed = ids.clone()
        changed[0, 4] = (ids[0, 4] % 96) + 1
        _, other = model.probe(changed)
    # token 5 sees token 4 through cross-attention, but its *entry* is the state after token 2: tick-0 changes only
    # through the observation; token 3 (before 4 in the chunk) is untouched
    state, state2 = base[0].state[0], other[0].state[0]
    torch.testing.assert_close(state[:4], state2[:4])
    assert not torch.allclose(state[4], state2[4])
    # the next chunk (tokens 6-8) enters from token 5's final state, which changed
    assert not torch.allclose(state[6:], state2[6:])


@pytest.mark.parametrize("carry", CARRIES)
def test_left_padded_batch_equals_its_rows_alone(carry):
    model = tiny_model(ctm_readout="last", **carry)
    short, long = _ids(1, 4, seed=1), _ids(1, 8, seed=2)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = short, 1
    ids[1], mask[1] = long, 1
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
        alone_short = model.generate(short, max_new_tokens=6, **GREEDY)
        alone_long = model.generate(long, max_new_tokens=6, **GREEDY)
        # the forward pass of the padded batch equals each row alone too
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(logits[0, 4:], model(short).logits[0], rtol=0, atol=1e-5)
    assert torch.equal(generated[0, 4:], alone_short[0])
    assert torch.equal(generated[1], alone_long[0])


@pytest.mark.parametrize("carry", CARRIES)
@pytest.mark.parametrize(
    "mode",
    [
        dict(),
        dict(num_beams=3),
        dict(num_beams=2, num_return_sequences=2),
        dict(do_sample=True, num_return_sequences=2),
        dict(do_sample=True, num_beams=2),
    ],
    ids=["greedy", "beam", "beam-return2", "sample", "beam-sample"],
)
def test_generation_with_cache_equals_without(carry, mode):
    model = tiny_model(ctm_readout="last", **carry)
    ids = _ids(2, 5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = {**GREEDY, **mode, "max_new_tokens": 6}
    with torch.no_grad():
        torch.manual_seed(7)
        cached = model.generate(ids, attention_mask=mask, **kwargs)
        torch.manual_seed(7)
        recomputed = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("carry", CARRIES)
def test_continue_from_a_returned_cache_equals_one_shot(carry):
    model = tiny_model(ctm_readout="last", **carry)
    ids = _ids(1, 5)
    with torch.no_grad():
        one_shot = model.generate(ids, max_new_tokens=8, **GREEDY)
        first = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
        assert isinstance(first.cache, CTMCache)
        continued = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, **GREEDY)
    assert torch.equal(continued, one_shot)


def test_beam_reordering_moves_the_thinking_state_with_the_kv():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=2)
    with torch.no_grad():
        cache = model(_ids(3, 5), use_cache=True).cache
    layer = cache.layers[1]
    before_state, before_keys = layer.last.state.clone(), layer.keys.clone()
    before_seen = cache.seen_tokens.clone()
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    assert torch.equal(layer.last.state, before_state[order]) and torch.equal(layer.keys, before_keys[order])
    assert layer.observed_keys.shape[0] == 3
    assert torch.equal(cache.seen_tokens, before_seen[order])
    cache.batch_repeat_interleave(2)
    assert layer.last.state.shape[0] == 6 and layer.entry.alpha_out.shape[0] == 6 and cache.seen_tokens.shape == (6,)
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert layer.last.trace.shape[0] == 2 and layer.observed_values.shape[0] == 2
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    assert not cache.is_croppable


def test_detach_cuts_the_graph_but_keeps_the_values():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=2).train()
    cache = model(_ids(1, 4), use_cache=True).cache
    state = cache.layers[0].last.state
    assert state.requires_grad
    cache.detach_()
    assert not cache.layers[0].last.state.requires_grad and torch.equal(cache.layers[0].last.state, state)
    assert not cache.layers[0].keys.requires_grad


@pytest.mark.parametrize("chunk", [1, 3])
def test_snapshot_through_safetensors_equals_carrying_the_cache_without_kv(tmp_path, chunk):
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=chunk, ctm_readout="last")
    conversation_a, conversation_b = _ids(1, 6, seed=3), _ids(1, 5, seed=4)  # 6 is a multiple of both chunk sizes
    with torch.no_grad():
        carried = model(conversation_a, use_cache=True).cache
        carried.save_thinking_state(tmp_path / "episode.safetensors", metadata={"topic": "test"})
        assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing half-written
        via_cache = model(conversation_b, cache=carried.drop_attention_(), use_cache=True).logits

        snapshot = CTMCache.load_thinking_state(tmp_path / "episode.safetensors", model.config)
        assert snapshot.get_seq_length() == 0
        via_snapshot = model(conversation_b, cache=snapshot, use_cache=True).logits
        fresh = model(conversation_b).logits
    torch.testing.assert_close(via_snapshot, via_cache, rtol=0, atol=1e-6)
    assert not torch.allclose(via_snapshot, fresh, atol=1e-4)  # the snapshot carries something


def test_snapshot_api_shapes_batching_and_errors():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=2)
    with torch.no_grad():
        cache = model(_ids(1, 4), use_cache=True).cache
    tensors = cache.thinking_state_dict()
    assert set(tensors) == {
        f"layers.{i}.{field}"
        for i in (0, 1)
        for field in ("state", "trace", "alpha_out", "beta_out", "alpha_action", "beta_action")
    }
    assert tensors["layers.0.trace"].shape == (1, 32, 4) and tensors["layers.1.alpha_out"].dtype == torch.float32
    batch = CTMCache.from_thinking_state(model.config, tensors, batch_size=3)
    assert batch.layers[0].last.state.shape == (3, 32)
    same_rows = _ids(1, 2).expand(3, 2)
    with torch.no_grad():
        out = model(same_rows, cache=batch, use_cache=True)
        fresh = model(same_rows)
    # every row started from the one snapshot: identical rows, and not the learned start state
    torch.testing.assert_close(out.logits[1:], out.logits[:1].expand(2, -1, -1))
    assert not torch.allclose(out.logits, fresh.logits, atol=1e-4)
    with pytest.raises(ValueError, match="ctm_carry='chunk'"):
        CTMCache.from_thinking_state(tiny_model().config, tensors)
    with pytest.raises(ValueError, match="no thinking state"):
        CTMCache(model.config).thinking_state_dict()
    with pytest.raises(ValueError, match="missing"):
        CTMCache.from_thinking_state(model.config, {"layers.0.state": tensors["layers.0.state"]})


@pytest.mark.parametrize("carry", CARRIES)
def test_surprise_weight_one_is_a_no_op_and_other_weights_act_alike_in_both_paths(carry):
    model = tiny_model(ctm_readout="last", **carry)
    ids = _ids(2, 9)
    weights = torch.rand(2, 9, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.25
    with torch.no_grad():
        plain = model(ids).logits
        torch.testing.assert_close(model(ids, surprise_weight=torch.ones(2, 9)).logits, plain, rtol=0, atol=0)
        weighted = model(ids, surprise_weight=weights).logits
        assert not torch.allclose(weighted, plain, atol=1e-4)
        out = model(ids[:, :4], surprise_weight=weights[:, :4], use_cache=True)
        pieces, cache = [out.logits], out.cache
        for t in range(4, 9):
            out = model(ids[:, t : t + 1], cache=cache, surprise_weight=weights[:, t : t + 1], use_cache=True)
            pieces.append(out.logits)
            cache = out.cache
    torch.testing.assert_close(torch.cat(pieces, 1), weighted, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="surprise_weight"):
        model(ids, surprise_weight=torch.ones(2, 3))


def test_text_generation_pipeline():
    tokenizer = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=300)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    model = tiny_model(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, ctm_carry="chunk", ctm_chunk_size=2
    )
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generator("the cat", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("the cat")
    batched = generator(["the cat", "a dog ran in"], max_new_tokens=5, do_sample=False, batch_size=2)
    assert batched[0][0]["generated_text"] == result[0]["generated_text"]
