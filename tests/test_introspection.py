"""The model watching itself think: certainty through `generate` and adaptive halting."""

import pytest
import torch
from conftest import tiny_model

from modeling_ctm.fmri import sync_change


def full_forward_view(model, sequences, positions):
    """Certainty of the readout tick, that tick, and the per-layer sync change at `positions` of a full forward."""
    with torch.no_grad():
        outputs, layers = model.probe(sequences)
    selected = outputs.selected_tick[:, positions]
    certainty = outputs.certainty[:, positions].gather(-1, selected[..., None])[..., 0]
    sync = torch.stack([sync_change(layers[idx])[:, positions] for idx in sorted(layers)], dim=2)
    return certainty, selected, sync


@pytest.mark.parametrize("carry", [dict(), dict(ctm_carry="chunk", ctm_chunk_size=2)])
def test_generate_certainty_equals_the_full_forward_greedy(carry):
    model = tiny_model(**carry)
    prompt = torch.randint(1, 97, (2, 5))
    out = model.generate(
        prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_certainty=True
    )
    assert out.certainty.shape == (2, 6) and out.selected_tick.shape == (2, 6)
    assert out.sync_divergence.shape == (2, 6, 2, 3)
    positions = torch.arange(5 - 1, 5 - 1 + 6)  # the position whose logits chose each new token
    certainty, selected, sync = full_forward_view(model, out.sequences, positions)
    torch.testing.assert_close(out.certainty, certainty, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.selected_tick, selected)
    torch.testing.assert_close(out.sync_divergence, sync, rtol=1e-4, atol=1e-5)


def test_generate_certainty_follows_the_beams():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=3)
    prompt = torch.randint(1, 97, (2, 4))
    out = model.generate(
        prompt,
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_certainty=True,
    )
    n_new = out.sequences.shape[1] - 4
    assert out.certainty.shape == (4, n_new)
    positions = torch.arange(3, 3 + n_new)
    certainty, selected, sync = full_forward_view(model, out.sequences, positions)
    produced = out.beam_indices >= 0
    assert produced.any() and not torch.equal(out.beam_indices[:, 1:], out.beam_indices[:, :1].expand(-1, n_new - 1))
    torch.testing.assert_close(out.certainty[produced], certainty[produced], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.selected_tick[produced], selected[produced])
    torch.testing.assert_close(out.sync_divergence[produced], sync[produced], rtol=1e-4, atol=1e-5)


def test_generate_without_certainty_is_untouched_and_bad_requests_are_refused():
    model = tiny_model()
    prompt = torch.randint(1, 97, (1, 4))
    plain = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert not hasattr(plain, "certainty") or plain.get("certainty") is None
    assert not model.model.tick_observers
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(prompt, max_new_tokens=2, do_sample=False, output_certainty=True)
    with pytest.raises(ValueError, match="last layer thinks"):
        tiny_model(ctm_layers=[0]).generate(
            prompt, max_new_tokens=2, return_dict_in_generate=True, output_certainty=True
        )
