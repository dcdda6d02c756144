import pytest
import torch
from tiny import assert_todays_default, tiny_model

from modeling_ctm.configuration_ctm import CTMConfig
from modeling_ctm.gauge import block_health


def test_ctm_sync_seed_is_validated():
    with pytest.raises(ValueError, match="ctm_sync_seed.*start_state"):
        CTMConfig(ctm_sync_seed="nope")


def test_default_seed_is_todays_computation_and_zero_changes_it():
    today = assert_todays_default()
    assert today.config.ctm_sync_seed == "start_state"
    assert_todays_default(ctm_sync_seed="start_state")
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    zero_model = tiny_model(ctm_sync_seed="zero")
    with torch.no_grad():
        difference = (tiny_model()(ids).logits - zero_model(ids).logits).abs().max()
    assert difference > 1e-3  # far above rounding: the zero seed computes something else
    # zero seed: the S_out accumulator holds nothing of the start state
    for layer in block_health(zero_model, ids)["layers"].values():
        assert layer["entry_share"] == 0.0


@pytest.mark.parametrize("readout_norm", ["none", "rms_gate"])
def test_zero_seed_keeps_the_exact_kept_mlp_start(readout_norm):
    from test_exact_start import _phase1

    from modeling_ctm.training.phases import start_thinking

    language = _phase1()
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    model = start_thinking(language, ctm_sync_seed="zero", ctm_readout_norm=readout_norm).eval()
    assert model.config.ctm_mlp == "keep" and model.config.ctm_sync_seed == "zero"
    torch.testing.assert_close(model(ids).logits, language(ids).logits, atol=1e-6, rtol=0)
