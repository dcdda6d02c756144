"""`ctm_state_norm="rms"`: the neuron-level models' output is RMS-normalised every tick, so a carried state cannot grow
over a long conversation (a block that mattered grew ||S_out|| to 1e9 over 2,048 carried tokens)."""

import pytest
import torch
from tiny import assert_cached_decoding_exact, assert_todays_default, tiny_model

from modeling_ctm.configuration_ctm import CTMConfig
from modeling_ctm.observers_ctm import CTMTickObserver


class StateNorms(CTMTickObserver):
    def __init__(self):
        self.rms = []

    def on_tick(self, event):
        self.rms.append(event.after.state.pow(2).mean(-1).sqrt())


def test_state_norm_is_validated_and_the_default_is_todays_computation():
    with pytest.raises(ValueError, match="ctm_state_norm.*'none', 'rms'"):
        CTMConfig(ctm_state_norm="layer")
    assert assert_todays_default().config.ctm_state_norm == "none"
    assert_todays_default(ctm_state_norm="none")


def test_every_ticks_state_has_unit_rms_even_when_the_tick_map_amplifies():
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    for norm, bounded in (("rms", True), ("none", False)):
        model = tiny_model(ctm_state_norm=norm, ctm_layers="last", ctm_carry="chunk", ctm_chunk_size=2).eval()
        with torch.no_grad():  # an amplifying neuron-level model: without the norm the carried state grows
            model.model.layers[-1].thinking.neurons.w2.mul_(30.0)
            observed = StateNorms()
            with model.observing(observed):
                model(ids)
        rms = torch.cat([r.flatten() for r in observed.rms])
        if bounded:
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=1e-4)
        else:
            assert rms.max() > 10


def test_state_norm_keeps_cached_decoding_exact():
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    model = tiny_model(ctm_state_norm="rms", ctm_carry="chunk", ctm_chunk_size=3).eval()
    assert_cached_decoding_exact(model, ids)
