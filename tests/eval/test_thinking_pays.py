"""eval/thinking_pays.py: its per-token readouts agree with the model's own, and the --quick run writes every arm."""

import json
import math

import pytest
import thinking_pays as tp  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import torch
from tiny import TINY, tiny_model

from modeling_ctm.training.phases import language_config, start_thinking


def test_per_token_readouts_match_the_model_losses():
    model = tiny_model(ctm_layers="last")
    sequences = [torch.randint(1, TINY["vocab_size"], (n,)) for n in (9, 13)]
    scores = tp.token_scores(model, sequences)
    assert scores["tick_ce"].shape == (8 + 12, 3)
    sums = dict.fromkeys(("final", "most_certain", "argmin", "tick_mixture"), 0.0)
    for ids in sequences:
        out = model(ids[None], labels=ids[None])
        for name, loss in (("final", out.loss_final_tick), ("most_certain", out.loss_most_certain_tick),
                           ("argmin", out.loss_argmin_tick), ("tick_mixture", out.loss_tick_mixture)):  # fmt: skip
            sums[name] += loss.item() * (len(ids) - 1)
    for name, total in sums.items():
        assert tp.readout_ce(scores, name).mean().item() == pytest.approx(total / 20, rel=1e-5), name
    # the K' ablation reads the first K' ticks: K'=1 makes every readout the first tick
    one = {name: tp.readout_ce(scores, name, 1) for name in ("final", "most_certain", "tick_mixture")}
    assert all(torch.allclose(v, scores["tick_ce"][:, 0]) for v in one.values())
    with pytest.raises(ValueError, match="readout"):
        tp.readout_ce(scores, "best")


def test_first_ticks_of_a_longer_run_equal_a_shorter_run():
    """What the K' < K ablation relies on: without a carried state, tick k does not depend on how many follow."""
    torch.manual_seed(0)
    language = type(tiny_model())(language_config(**{k: v for k, v in TINY.items() if k != "ctm_layers"}))
    long = start_thinking(language, ctm_ticks=3).eval()
    with torch.no_grad():
        long.model.layers[-1].thinking.out_proj.weight.normal_(0.0, 0.3)
    short = start_thinking(language, ctm_ticks=2).eval()
    state = {k: v[:2] if k.endswith("tick_embed") else v for k, v in long.state_dict().items()}
    short.load_state_dict(state)
    ids = torch.randint(1, TINY["vocab_size"], (7,))
    a, b = tp.token_scores(long, [ids]), tp.token_scores(short, [ids])
    torch.testing.assert_close(a["tick_ce"][:, :2], b["tick_ce"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.experiment
def test_quick_run_writes_every_arm(tmp_path):
    result = tp.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["arms"]) >= {"continued", "replace", "exact_start", "exact_start_k1", "exact_start_gated"}
    for arm in saved["arms"].values():
        assert math.isfinite(arm["readout_ce"]["mean"]) and arm["readout_ce"]["sd"] >= 0
        assert arm["flops_per_token_training"]["mean"] > 0
    arms = saved["arms"]
    # thinking costs FLOPs: K ticks > 1 tick > no block; the kept MLP adds its own cost on top of the block
    assert (
        arms["exact_start"]["flops_per_token_training"]["mean"]
        > arms["exact_start_k1"]["flops_per_token_training"]["mean"]
    )
    assert (
        arms["exact_start_k1"]["flops_per_token_training"]["mean"]
        > arms["continued"]["flops_per_token_training"]["mean"]
    )
    assert (
        arms["exact_start"]["flops_per_token_training"]["mean"] > arms["replace"]["flops_per_token_training"]["mean"]
    )
    assert arms["continued_iso_flops"]["steps"]["mean"] > arms["continued"]["steps"]["mean"]
    assert len(saved["e2_exact_start"]["selection_histogram"]) == 3
    assert len(saved["e2_exact_start_gated"]["per_tick_ce"]) == 3
    # the readout variants cost what exact_start costs (a norm and a scalar gate are not counted)
    for arm in ("exact_start_rms", "exact_start_gated"):
        assert arms[arm]["flops_per_token_training"]["mean"] == arms["exact_start"]["flops_per_token_training"]["mean"]
    assert "exact_start_gated:" in saved["answer"]
    assert saved["answer"].startswith("Per step:") and result["answer"] == saved["answer"]
    text = (tmp_path / "results.md").read_text()
    assert "±" in text and "exact_start_k1" in text and "K' < K" in text


@pytest.mark.experiment
def test_arm_subsets_keep_the_controls():
    with pytest.raises(ValueError, match="including"):
        tp.run(tp.Settings(**tp.QUICK), 1, None, arm_names=("exact_start", "exact_start_gated"))
    with pytest.raises(ValueError, match="choose from"):
        tp.run(tp.Settings(**tp.QUICK), 1, None, arm_names=("continued", "continued_iso_flops", "exact_start", "x"))


@pytest.mark.experiment
def test_gated_arm_starts_exactly_at_phase_one():
    torch.manual_seed(0)
    language = type(tiny_model())(language_config(**{k: v for k, v in TINY.items() if k != "ctm_layers"})).eval()
    settings = tp.Settings(**tp.QUICK)
    model = tp.build_arm("exact_start_gated", language, settings).eval()
    assert model.config.ctm_readout_norm == "rms_gate" and model.config.ctm_mlp == "keep"
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    torch.testing.assert_close(model(ids).logits, language(ids).logits.log_softmax(-1), atol=1e-6, rtol=0)
