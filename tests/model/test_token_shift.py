"""`ctm_token_shift="embedding"`: x_t + W x_{t-1}; off by default, and exact in cached decoding, with left
padding and with beams."""

import pytest
import torch
from tiny import assert_todays_default, tiny_config, tiny_model

from modeling_ctm import CTMCache, CTMConfig, CTMForCausalLM
from modeling_ctm.modeling_ctm import CTMTokenShift


GREEDY = dict(do_sample=False, pad_token_id=0)
ARCHITECTURES = [
    pytest.param(dict(ctm_layers="none"), id="plain"),
    pytest.param(dict(ctm_carry="none"), id="ctm"),
    pytest.param(dict(ctm_carry="chunk", ctm_chunk_size=3), id="ctm-chunk3"),
]


def _ids(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def shifted_model(seed=0, **overrides) -> CTMForCausalLM:
    """A tiny model whose zero-initialised shift is given weight, so a wrong previous token shows in the logits."""
    model = tiny_model(seed=seed, ctm_token_shift="embedding", ctm_readout="last", **overrides)
    with torch.no_grad():
        model.model.token_shift.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return model


def test_ctm_token_shift_is_validated():
    with pytest.raises(ValueError, match=r"ctm_token_shift='conv'.*\('none', 'embedding'\)"):
        CTMConfig(ctm_token_shift="conv")


def test_default_is_off_and_a_fresh_shift_adds_nothing():
    ids = _ids(2, 9)
    default = tiny_model()
    assert default.config.ctm_token_shift == "none" and default.model.token_shift is None
    assert not any("token_shift" in name for name in default.state_dict())
    assert_todays_default(ctm_token_shift="none")
    assert_todays_default()
    fresh = tiny_model(ctm_token_shift="embedding")
    assert torch.equal(fresh.model.token_shift.weight, torch.zeros(32, 32))  # `_init_weights` fills it with zeros
    missing, unexpected = fresh.load_state_dict(default.state_dict(), strict=False)
    assert missing == ["model.token_shift.weight"] and not unexpected
    torch.testing.assert_close(fresh(ids).logits, default(ids).logits, atol=1e-6, rtol=0)  # a zero shift adds 0
    assert not torch.allclose(shifted_model()(ids).logits, default(ids).logits, atol=1e-4)


def test_the_previous_token_is_the_last_real_one_and_zero_before_the_first():
    four = dict(hidden_size=4, num_attention_heads=2, num_key_value_heads=1, ctm_n_synch_out=4, ctm_n_synch_action=4)
    shift = CTMTokenShift(tiny_config(**four))
    with torch.no_grad():
        shift.weight.copy_(torch.eye(4))
    embeds = torch.arange(1.0, 7.0)[None, :, None].expand(1, 6, 4)  # position t holds t + 1
    mask = torch.tensor([[False, True, True, False, True, True]])  # left padding, and a hole at 3
    shifted, last = shift(embeds, mask, None)
    previous = (shifted - embeds)[0, :, 0]
    assert previous.tolist() == [0.0, 0.0, 2.0, 3.0, 3.0, 5.0]  # the hole and the padding are skipped
    assert last[0, 0] == 6.0
    carried = torch.full((1, 4), 9.0)
    shifted, last = shift(embeds[:, :2], torch.tensor([[False, False]]), carried)
    assert (shifted - embeds[:, :2]).eq(9.0).all() and torch.equal(last, carried)  # no real token: carried stays
    shifted, _ = shift(embeds[:, :3], None, carried)
    assert (shifted - embeds[:, :3])[0, :, 0].tolist() == [9.0, 1.0, 2.0]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("prompt_length", [1, 4])
def test_token_by_token_decoding_equals_the_full_forward(architecture, prompt_length):
    model = shifted_model(**architecture)
    ids = _ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prompt_length], use_cache=True)
        pieces, cache = [out.logits], out.cache
        for t in range(prompt_length, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.cache
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)
    assert torch.equal(cache.previous_embeds, model.model.embed_tokens(ids[:, -1]))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_left_padded_batch_equals_its_rows_alone(architecture):
    model = shifted_model(**architecture)
    short, long = _ids(1, 4, seed=1), _ids(1, 8, seed=2)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = short, 1
    ids[1], mask[1] = long, 1
    ids[0, :4] = 5  # padding with real-looking ids must not leak into the first real token
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
        alone_short = model.generate(short, max_new_tokens=6, **GREEDY)
        alone_long = model.generate(long, max_new_tokens=6, **GREEDY)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(logits[0, 4:], model(short).logits[0], rtol=0, atol=1e-5)
    assert torch.equal(generated[0, 4:], alone_short[0])
    assert torch.equal(generated[1], alone_long[0])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(
    "mode",
    [dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2), dict(do_sample=True, num_beams=2)],
    ids=["greedy", "beam", "beam-return2", "beam-sample"],
)
def test_generation_with_cache_equals_recomputing_the_full_sequence(architecture, mode):
    model = shifted_model(**architecture)
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


def test_a_carried_cache_continues_a_beam_search_like_the_full_sequence():
    """The second turn's beams repeat the carried cache's rows, previous embedding included."""
    model = shifted_model(ctm_layers="none")
    ids = _ids(1, 5)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        turn = dict(max_new_tokens=4, num_beams=2, **GREEDY)
        continued = model.generate(first.sequences, cache=first.cache, **turn)
        recomputed = model.generate(first.sequences, use_cache=False, **turn)
    assert torch.equal(continued, recomputed)


def test_cache_row_operations_move_the_previous_embedding():
    model = shifted_model()
    with torch.no_grad():
        cache = model(_ids(3, 4), use_cache=True).cache
    before = cache.previous_embeds.clone()
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    assert torch.equal(cache.previous_embeds, before[order])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.previous_embeds, before[order].repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.previous_embeds, before[[2, 0]])
    cache.drop_attention_()  # like the KV, an earlier position's input: a cut leaves only the thinking state
    assert cache.previous_embeds is None
    cache.reset()
    assert cache.previous_embeds is None and cache.seen_tokens is None


def test_a_snapshot_start_equals_a_cut_cache_and_has_no_previous_token():
    model = shifted_model(ctm_carry="chunk", ctm_chunk_size=3)
    first, second = _ids(1, 6, seed=3), _ids(1, 5, seed=4)
    with torch.no_grad():
        carried = model(first, use_cache=True).cache
        snapshot = CTMCache.from_thinking_state(model.config, carried.thinking_state_dict())
        assert not any("previous" in key for key in carried.thinking_state_dict())
        via_cut = model(second, cache=carried.drop_attention_(), use_cache=True).logits
        via_snapshot = model(second, cache=snapshot, use_cache=True).logits
    torch.testing.assert_close(via_snapshot, via_cut, rtol=0, atol=1e-6)


def test_zero_initialised_shift_learns_and_detach_cuts_its_carry():
    model = tiny_model(ctm_token_shift="embedding", ctm_layers="none").train()
    ids = _ids(2, 6)
    out = model(ids, labels=ids, use_cache=True)
    out.loss.backward()
    assert model.model.token_shift.weight.grad.abs().sum() > 0
    assert out.cache.previous_embeds.requires_grad
    out.cache.detach_()
    assert not out.cache.previous_embeds.requires_grad
