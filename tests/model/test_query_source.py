"""`ctm_query_source="state"`: each tick's cross-attention query is made of the state the previous tick produced (
26's thinking suite: a hop per tick), behind a validated field whose default is today's computation."""

import pytest
import torch
from tiny import assert_cached_decoding_exact, assert_todays_default, tiny_model

from modeling_ctm.configuration_ctm import CTMConfig
from modeling_ctm.observers_ctm import CTMTickObserver


def test_ctm_query_source_is_validated():
    with pytest.raises(ValueError, match="ctm_query_source.*'sync_action', 'state'"):
        CTMConfig(ctm_query_source="z")


def test_default_is_todays_computation_with_todays_weights():
    today = assert_todays_default()
    assert today.config.ctm_query_source == "sync_action"
    block = today.model.layers[-1].thinking
    assert block.q_proj.in_features == today.config.ctm_n_synch_action
    assert_todays_default(ctm_query_source="sync_action")


def test_state_query_reads_the_previous_ticks_state():
    """With the state as query, replacing tick 0's state changes what tick 1 attends to, and so tick 1's state; the
    action synchronisation (still kept for carry and snapshots) no longer reaches the query."""
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    model = tiny_model(ctm_query_source="state", ctm_layers="last", ctm_ticks=2).eval()
    block = model.model.layers[-1].thinking
    assert block.q_proj.in_features == model.config.hidden_size

    class Replace(CTMTickObserver):
        def __init__(self, scale):
            self.scale, self.tick1 = scale, None

        def intervene(self, event):
            return event.after.state * self.scale if event.tick == 0 else None

        def on_tick(self, event):
            if event.tick == 1:
                self.tick1 = event.after.state.clone()

    plain, scaled = Replace(1.0), Replace(-3.0)
    with torch.no_grad():
        with model.observing(plain):
            model(ids)
        with model.observing(scaled):
            model(ids)
    assert not torch.allclose(plain.tick1, scaled.tick1)
    for source, moves in (("state", False), ("sync_action", True)):
        # another forgetting rate changes the action synchronisation: it reaches the logits only through the query
        model = tiny_model(ctm_query_source=source, ctm_layers="last", ctm_ticks=3).eval()
        with torch.no_grad():
            before = model(ids).logits
            model.model.layers[-1].thinking.sync_action.decay.fill_(5.0)
            moved = (before - model(ids).logits).abs().max()
            assert (moved > 1e-4) == moves, (source, moved)


def test_state_query_is_exact_in_cached_decoding():
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    model = tiny_model(ctm_query_source="state", ctm_carry="chunk", ctm_chunk_size=3).eval()
    assert_cached_decoding_exact(model, ids)


def test_input_then_state_needs_the_injected_input_and_is_validated():
    with pytest.raises(ValueError, match="ctm_query_source.*needs ctm_input_injection='every_tick'"):
        CTMConfig(ctm_layers="last", ctm_query_source="input_then_state")
    CTMConfig(ctm_layers="last", ctm_query_source="input_then_state", ctm_input_injection="every_tick")


def test_input_then_state_asks_the_token_first_and_the_state_after(monkeypatch):
    """Tick 0's query is the token's own input alone: another start state leaves tick 0's question as it was (it moves
    it with the "state" source); tick 1's query is made of the state."""
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    asked = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda q, *a, **k: asked.append(q.clone()) or sdpa(q, *a, **k)
    )

    def block_queries(source, start_scale):
        model = tiny_model(
            ctm_query_source=source, ctm_input_injection="every_tick", ctm_layers="last", ctm_ticks=2, num_hidden_layers=1
        ).eval()
        with torch.no_grad():
            model.model.layers[-1].thinking.start_state.mul_(start_scale)
            asked.clear()
            model(ids)
        return asked[-2:]  # the block's two ticks (the layer's self-attention asks first)

    tick0, tick1 = block_queries("input_then_state", 1.0)
    moved0, moved1 = block_queries("input_then_state", -5.0)
    torch.testing.assert_close(tick0, moved0, atol=1e-6, rtol=0)  # tick 0 asks with the input alone
    assert not torch.allclose(tick1, moved1)
    tick0, _ = block_queries("state", 1.0)
    moved0, _ = block_queries("state", -5.0)
    assert not torch.allclose(tick0, moved0)


def test_learned_query_scale_starts_at_the_fixed_scale_and_sharpens():
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    fixed, learned = tiny_model(ctm_query_scale="fixed"), tiny_model(ctm_query_scale="learned")
    block = learned.model.layers[-1].thinking
    assert fixed.model.layers[-1].thinking.query_log_scale is None
    assert block.query_log_scale.shape == (block.num_heads,) and torch.all(block.query_log_scale == 0)
    torch.testing.assert_close(fixed(ids).logits, learned(ids).logits, atol=1e-6, rtol=0)  # gain 1 at init
    with torch.no_grad():
        block.query_log_scale.fill_(2.0)
    assert not torch.allclose(fixed(ids).logits, learned(ids).logits)
    with pytest.raises(ValueError, match="ctm_query_scale.*'fixed', 'learned'"):
        CTMConfig(ctm_query_scale="sharp")
