"""`ctm_input_injection="every_tick"`: the token's own input reaches every tick (part of the awake block)."""

import pytest
import torch
from tiny import assert_cached_decoding_exact, assert_todays_default, tiny_model

from modeling_ctm.configuration_ctm import CTMConfig


def test_ctm_input_injection_is_validated():
    with pytest.raises(ValueError, match="ctm_input_injection.*every_tick"):
        CTMConfig(ctm_input_injection="always")


def test_default_is_todays_computation_and_has_no_extra_weights():
    today = assert_todays_default()  # loads the stored weights strictly: an extra weight would fail it
    assert today.config.ctm_input_injection == "none"
    assert not any("input_proj" in name for name in today.state_dict())
    assert_todays_default(ctm_input_injection="none")


def _first_tick_states(model, ids):
    """The state each token's first tick produced, per thinking layer (B, T, D)."""
    from modeling_ctm.observers_ctm import CTMTickObserver

    class FirstTick(CTMTickObserver):
        states = {}

        def on_tick(self, event):
            if event.tick == 0:
                self.states[event.layer_idx] = event.after.state[0]

    observer = FirstTick()
    with model.observing(observer):
        model(ids)
    return observer.states


def test_the_first_tick_reads_the_token_itself():
    """Without injection, tick 0 of two different tokens at the same position with the same prefix is the same
    function of the prefix (one query for all tokens); with it, the token's own input changes its state."""
    prefix = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    a = torch.cat([prefix, torch.tensor([[7]])], 1)
    b = torch.cat([prefix, torch.tensor([[8]])], 1)
    for injection, differs_by_more_than in (("none", 0.0), ("every_tick", 1e-3)):
        model = tiny_model(ctm_input_injection=injection, ctm_layers="last").eval()
        (layer,) = _first_tick_states(model, a).keys()
        delta = (_first_tick_states(model, a)[layer][-1] - _first_tick_states(model, b)[layer][-1]).norm().item()
        if injection == "none":
            # the token enters only as the last key of the cross-attention, so tick 0 still moves, but little
            reference = delta
        else:
            assert delta > differs_by_more_than and delta > 2 * reference


def test_injection_is_exact_in_cached_decoding_and_keeps_the_exact_start():
    from test_exact_start import _phase1

    from modeling_ctm.training.phases import start_thinking

    language = _phase1()
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    model = start_thinking(language, ctm_input_injection="every_tick").eval()
    torch.testing.assert_close(model(ids).logits, language(ids).logits, atol=1e-6, rtol=0)

    model = tiny_model(ctm_input_injection="every_tick", ctm_carry="chunk", ctm_chunk_size=3).eval()
    assert_cached_decoding_exact(model, ids)
