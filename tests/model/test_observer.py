"""The tick observer: the one way in to the ticks (probe, plasticity statistics, dream diagnostics, certainty)."""

import pytest
import torch
from tiny import tiny_model

from modeling_ctm import CTMTickObserver


class Recorder(CTMTickObserver):
    def __init__(self):
        self.ticks, self.layers, self.outputs = [], [], []

    def on_tick(self, event):
        self.ticks.append((event.layer_idx, event.tick, event.columns.clone(), event.after.state.clone()))

    def on_layer(self, event):
        self.layers.append(event.layer_idx)

    def on_output(self, event):
        self.outputs.append(event)


def test_observer_sees_every_layer_tick_and_output_and_changes_nothing():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=4)
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        plain = model(ids).logits
        with model.observing(Recorder()) as recorder:
            observed = model(ids).logits
    torch.testing.assert_close(observed, plain, rtol=0, atol=0)
    # 10 tokens in chunks of 4 -> 3 steps, 2 layers, 3 ticks
    assert len(recorder.ticks) == 3 * 2 * 3
    assert recorder.layers == [0, 1]
    assert len(recorder.outputs) == 1 and recorder.outputs[0].certainty.shape == (2, 10, 3)
    covered = torch.cat([columns for layer, tick, columns, _ in recorder.ticks if layer == 0 and tick == 0], dim=1)
    assert sorted(covered[0].tolist()) == list(range(10))
    assert not model.model.tick_observers  # the context removed it


def test_probe_is_an_observer_and_agrees_with_a_hand_written_one():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6))
    _, layers = model.probe(ids)
    with torch.no_grad(), model.observing(Recorder()) as recorder:
        model(ids)
    for layer_idx, tick, columns, state in recorder.ticks:
        torch.testing.assert_close(layers[layer_idx].state[0, columns[0], tick], state[0])


def test_intervention_through_an_observer_resynchronises_the_tick():
    class Silence(CTMTickObserver):
        def intervene(self, event):
            return torch.zeros_like(event.after.state) if (event.layer_idx, event.tick) == (1, 1) else None

        def on_tick(self, event):
            if (event.layer_idx, event.tick) == (1, 1):
                self.before, self.seen = event.before, event.after
                self.rate = event.decay_rates()

    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        plain = model(ids).logits
        with model.observing(Silence()) as silence:
            changed = model(ids).logits
    assert not torch.allclose(plain, changed)
    assert torch.count_nonzero(silence.seen.state) == 0
    # the accumulators advanced by the products of the replaced (zero) state: alpha keeps only its decayed part
    torch.testing.assert_close(silence.seen.alpha_out, silence.rate * silence.before.alpha_out)
    torch.testing.assert_close(silence.seen.beta_out, silence.rate * silence.before.beta_out + 1)


def test_observer_sees_cached_generate_steps_and_handles_remove():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=1)
    recorder = Recorder()
    handle = model.add_tick_observer(recorder)
    model.generate(torch.randint(1, 97, (1, 4)), max_new_tokens=5, do_sample=False)
    handle.remove()
    assert len(recorder.outputs) == 5  # the prompt, then one call per new token after the first
    model(torch.randint(1, 97, (1, 3)))
    assert len(recorder.outputs) == 5


def test_add_tick_observer_refuses_what_is_not_an_observer():
    with pytest.raises(TypeError, match="CTMTickObserver"):
        tiny_model().add_tick_observer(lambda event: None)
