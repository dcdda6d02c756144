"""`ctm_query_source="state"`: each tick's cross-attention query is made of the state the previous tick produced (issue
26's thinking suite: a hop per tick), behind a validated field whose default is today's computation."""

import pytest
import torch
from tiny import tiny_model

from modeling_ctm.configuration_ctm import CTMConfig
from modeling_ctm.observers_ctm import CTMTickObserver


def test_ctm_query_source_is_validated():
    with pytest.raises(ValueError, match="ctm_query_source.*'sync_action', 'state'"):
        CTMConfig(ctm_query_source="z")


def test_default_is_todays_computation_with_todays_weights():
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    today, explicit = tiny_model(), tiny_model(ctm_query_source="sync_action")
    block = today.model.layers[-1].thinking
    assert block.q_proj.in_features == today.config.ctm_n_synch_action
    assert torch.equal(today(ids).logits, explicit(ids).logits)


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
            assert torch.equal(before, model(ids).logits) != moves


def test_state_query_is_exact_in_cached_decoding():
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    model = tiny_model(ctm_query_source="state", ctm_carry="chunk", ctm_chunk_size=3).eval()
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    step = model(ids[:, 6:], cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([out.logits, step], 1), full, atol=1e-5, rtol=1e-5)
