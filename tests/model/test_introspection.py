"""The model watching itself think: certainty through `generate` and adaptive halting."""


import pytest
import torch
from tiny import tiny_model

from modeling_ctm.fmri import sync_change


def full_forward_view(model, sequences, positions):
    """Certainty of the readout tick, that tick, and the per-layer sync change at `positions` of a full forward."""
    with torch.no_grad():
        outputs, layers = model.probe(sequences)
    selected = outputs.selected_tick[:, positions]
    certainty = outputs.certainty[:, positions].gather(-1, selected[..., None])[..., 0]
    sync = torch.stack([sync_change(layers[idx])[:, positions] for idx in sorted(layers)], dim=2)
    return certainty, selected, sync, outputs.certainty[:, positions]


def assert_same_tick_up_to_ties(generated, all_ticks, atol=1e-5):
    """The tick `generate` read is the full forward's most certain one, except where two ticks' certainties tie within
    float noise (cached and full forwards round differently, and argmax of a near-tie may flip)."""
    chosen = all_ticks.gather(-1, generated[..., None])[..., 0]
    assert bool((chosen >= all_ticks.max(-1).values - atol).all()), (generated, all_ticks)


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
    certainty, selected, sync, all_ticks = full_forward_view(model, out.sequences, positions)
    torch.testing.assert_close(out.certainty, certainty, rtol=1e-4, atol=1e-5)
    assert_same_tick_up_to_ties(out.selected_tick, all_ticks)
    torch.testing.assert_close(out.sync_divergence, sync, rtol=1e-4, atol=1e-5)


def test_generate_certainty_of_a_left_padded_batch_equals_its_full_forward():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=2)
    prompt = torch.randint(1, 97, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    prompt = prompt * mask
    out = model.generate(
        prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
        output_certainty=True,
    )  # fmt: skip
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        outputs, layers = model.probe(out.sequences, attention_mask=full_mask)
    positions = torch.arange(5, 9)
    certainties = outputs.certainty[:, positions]
    # the most certain tick's certainty is continuous in the inputs: compare it everywhere
    torch.testing.assert_close(out.certainty, certainties.max(dim=-1).values, rtol=1e-4, atol=1e-5)
    # which tick that is: an argmax over near-equal certainties, which may flip across CPUs and thread counts
    assert_same_tick_up_to_ties(out.selected_tick, certainties)
    sync = torch.stack([sync_change(layers[idx])[:, positions] for idx in sorted(layers)], dim=2)
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
    certainty, selected, sync, all_ticks = full_forward_view(model, out.sequences, positions)
    produced = out.beam_indices >= 0
    assert produced.any() and not torch.equal(out.beam_indices[:, 1:], out.beam_indices[:, :1].expand(-1, n_new - 1))
    torch.testing.assert_close(out.certainty[produced], certainty[produced], rtol=1e-4, atol=1e-5)
    assert_same_tick_up_to_ties(out.selected_tick[produced], all_ticks[produced])
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


def set_halt_threshold(model, threshold):
    model.config.ctm_halt_threshold = threshold
    for layer in model.model.layers:
        if layer.is_thinking:
            layer.thinking.halt_threshold = threshold


from introspection import HaltCounter  # noqa: E402  # one home: the eval


def test_halting_off_and_halting_that_never_fires_are_bit_identical_to_today():
    ids = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        today = tiny_model()(ids)
        never = tiny_model(ctm_halt_threshold=1.0)(ids)
    torch.testing.assert_close(never.logits, today.logits, rtol=0, atol=0)
    torch.testing.assert_close(never.certainty, today.certainty, rtol=0, atol=0)


def test_halting_at_zero_is_thinking_for_one_tick():
    ids = torch.randint(1, 97, (2, 8))
    one_tick = tiny_model(ctm_ticks=1)
    halted = tiny_model(ctm_halt_threshold=0.0, ctm_readout="last")
    # same weights: the one-tick model is the three-tick model without ticks 1 and 2
    state = {k: v for k, v in halted.state_dict().items() if "tick_embed" not in k}
    one_tick.load_state_dict(state, strict=False)
    with torch.no_grad():
        one_tick.model.layers[0].thinking.tick_embed.copy_(halted.model.layers[0].thinking.tick_embed[:1])
        one_tick.model.layers[1].thinking.tick_embed.copy_(halted.model.layers[1].thinking.tick_embed[:1])
        torch.testing.assert_close(halted(ids).logits, one_tick(ids).logits)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_halted_cached_decode_equals_the_halted_full_forward(chunk_size):
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=chunk_size)
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        _, layers = model.probe(ids)
        # a threshold in the middle of the tokens' convergence after tick 0: some halt, some think on
        convergence = []
        for probe in layers.values():
            sync = probe.sync_out
            convergence.append(1 - (sync[:, :, 1] - sync[:, :, 0]).norm(dim=-1) / sync[:, :, 1].norm(dim=-1))
        values = torch.cat(convergence).flatten().sort().values
        middle = len(values) // 2  # halfway between two tokens' values: no token sits on the threshold
        set_halt_threshold(model, float(values[middle - 1 : middle + 1].mean()))
        with model.observing(HaltCounter()) as counter:
            full = model(ids)
        assert counter.skipped > 0 and counter.ran > 0
        cache, pieces = None, []
        for start, stop in [(0, 4), (4, 5), (5, 6), (6, 9)]:
            out = model(ids[:, start:stop], cache=cache, use_cache=True)
            cache = out.cache
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full.logits, tiny_model(ctm_carry="chunk", ctm_chunk_size=chunk_size)(ids).logits)


def test_halt_threshold_is_validated():
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="ctm_halt_threshold"):
            tiny_model(ctm_halt_threshold=bad)


def test_the_text_generation_pipeline_surfaces_the_certainty():
    from transformers import pipeline

    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    record = generator(
        "the cat", max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_certainty=True
    )[0]
    direct = model.generate(
        tokenizer("the cat", return_tensors="pt").input_ids, max_new_tokens=4, do_sample=False,
        return_dict_in_generate=True, output_certainty=True,
    )  # fmt: skip
    assert record["certainty"] == pytest.approx(direct.certainty[0].tolist())
    assert record["selected_tick"] == direct.selected_tick[0].tolist()
