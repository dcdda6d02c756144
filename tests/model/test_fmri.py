"""The shared fMRI picture: summary of a probe (layers x ticks) and its PNG."""

import numpy
import pytest
import torch
from tiny import tiny_model

from modeling_ctm.fmri import draw_thinking_map, summarize_probe


def test_summary_is_the_masked_mean_of_the_probe_and_sync_change_starts_from_the_entry():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    _, layers = model.probe(ids, attention_mask=mask)
    summary = summarize_probe(layers, token_mask=mask)
    assert summary["layers"] == [0, 1]
    for name in ("state_delta", "certainty", "sync_change"):
        assert summary[name].shape == (2, 3) and numpy.isfinite(summary[name]).all()
    real = mask.bool()
    expected = layers[1].certainty[real].mean(0).numpy()
    numpy.testing.assert_allclose(summary["certainty"][1], expected, rtol=1e-5)
    # tick 0 of layer 0 moves S_out away from the learned start state's synchronisation
    start = model.model.layers[0].thinking.start(torch.float32)
    entry = start.alpha_out[0] * start.beta_out[0].rsqrt()
    first = (layers[0].sync_out[0, 0, 0] - entry).norm()
    single = summarize_probe({0: layers[0]}, token_mask=torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    numpy.testing.assert_allclose(single["sync_change"][0, 0], first.item(), rtol=1e-5)
    later = (layers[0].sync_out[0, 0, 2] - layers[0].sync_out[0, 0, 1]).norm()
    numpy.testing.assert_allclose(single["sync_change"][0, 2], later.item(), rtol=1e-5)


def test_summary_refuses_bad_masks_and_empty_probes():
    model = tiny_model()
    _, layers = model.probe(torch.randint(1, 97, (1, 4)))
    with pytest.raises(ValueError, match="token_mask"):
        summarize_probe(layers, token_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="no token"):
        summarize_probe(layers, token_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="empty"):
        summarize_probe({})


def test_draw_thinking_map_writes_a_png(tmp_path):
    model = tiny_model()
    _, layers = model.probe(torch.randint(1, 97, (1, 4)))
    path = draw_thinking_map(summarize_probe(layers), tmp_path / "deep" / "map.png", title="a tiny model")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["map.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="summarize_probe"):
        draw_thinking_map({"layers": [0]}, tmp_path / "x.png")
