import math

import torch
from conftest import tiny_model

from modeling_ctm.gauge import block_health


def _ids(seed=0):
    torch.manual_seed(seed)
    return torch.randint(0, 97, (2, 10))


def test_gauge_values_are_finite_and_per_tick():
    model = tiny_model(ctm_mlp="keep")
    health = block_health(model, _ids())
    assert len(health["tick_ce"]) == model.config.ctm_ticks
    for layer in health["layers"].values():
        for key in ("block_to_residual", "block_to_mlp", "sync_variation", "entry_share"):
            assert math.isfinite(layer[key]) and layer[key] >= 0
        assert len(layer["tick_change"]) == len(health["tick_ce"])
    assert all(math.isfinite(x) for x in health["tick_ce"])


def test_zero_readout_gives_zero_ratios_and_replace_has_no_mlp_ratio():
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_thinking:
                layer.thinking.out_proj.weight.zero_()
    health = block_health(model, _ids())
    for layer in health["layers"].values():
        assert layer["block_to_residual"] == 0.0
        if model.config.ctm_mlp == "replace":
            assert layer["block_to_mlp"] is None


def test_block_ratio_scales_with_the_readout():
    # layer 0's residual is the embedding, untouched by its own block: doubling the readout doubles the ratio
    model = tiny_model()
    first = min(i for i, layer in enumerate(model.model.layers) if layer.is_thinking)
    before = block_health(model, _ids())["layers"][first]["block_to_residual"]
    with torch.no_grad():
        model.model.layers[first].thinking.out_proj.weight.mul_(2.0)
    after = block_health(model, _ids())["layers"][first]["block_to_residual"]
    assert before > 0 and math.isclose(after, 2 * before, rel_tol=1e-4)
