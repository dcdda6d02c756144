import math

import torch
from tiny import tiny_model

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


def test_inspect_prints_the_gauge_of_a_saved_checkpoint(tmp_path, capsys):
    from modeling_ctm.cli import main
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the code of Velmora is Quenth", "a dog ran in the park"] * 30, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=64)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["inspect", str(tmp_path / "model"), "--blocks", "2"]) == 0
    out = capsys.readouterr().out
    assert "block_to_residual" in out and "tick CE:" in out
    assert "served CE (most_certain readout):" in out and "training objective:" in out
    assert sum(line.split()[0].isdigit() for line in out.splitlines()) == len(model.config.ctm_layer_indices)


def test_the_carry_profile_shows_beta_growing_without_decay_and_bounded_with_it():
    import pytest

    from modeling_ctm.gauge import carry_profile

    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(3))
    fields = dict(ctm_layers="last", ctm_carry="chunk", ctm_chunk_size=4, max_position_embeddings=256)
    forever = carry_profile(tiny_model(**fields, ctm_decay_init_range=[0.0, 0.0]), ids, segment=32)[1]
    assert forever["position"].tolist() == list(range(90))
    # rate 1: every chunk adds K=3 updates to the entry's beta (4 at chunk 0: the seed's 1 plus 3 ticks)
    assert forever["beta_out"][0].item() == 4.0 and forever["beta_out"][89].item() == 4.0 + 3 * (89 // 4)
    forgetting = carry_profile(tiny_model(**fields, ctm_decay_init_range=[0.5, 1.0]), ids, segment=32)[1]
    bound = 1 / (1 - math.exp(-0.5))  # beta <- r beta + 1 with r <= exp(-0.5)
    assert forgetting["beta_out"].max().item() <= bound + 1e-5
    assert torch.isfinite(forgetting["tick0_convergence"]).all() and (forgetting["sync_norm"] > 0).all()
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 5\): allowed is one stream, \(1, T\)"):
        carry_profile(tiny_model(**fields), torch.zeros(2, 5, dtype=torch.long))


def test_served_ce_is_the_ce_of_the_served_logits_and_at_most_the_mean_tick_ce_for_the_mixture():
    import torch.nn.functional as F

    model = tiny_model(ctm_readout="tick_mixture", ctm_loss_tick_aux_weight=0.5).eval()
    with torch.no_grad():  # a block that speaks, so the ticks differ and the mixture is not a single tick
        for layer in model.model.layers:
            if layer.is_thinking:
                layer.thinking.out_proj.weight.normal_(0.0, 0.5)
    ids = _ids()
    health = block_health(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert math.isclose(health["served_ce"], expected, rel_tol=1e-5, abs_tol=1e-6)
    ticks = health["tick_ce"]
    assert len(set(round(x, 4) for x in ticks)) > 1  # the ticks disagree: the bound below is not an equality
    # the CE of a mean of distributions is at most the mean of their CEs (Jensen), per token and so on average
    assert health["served_ce"] <= sum(ticks) / len(ticks) + 1e-6
    # the objective carries the auxiliary per-tick term: it is another number, reported under its own name
    assert health["objective"] > health["served_ce"] + 1e-3
