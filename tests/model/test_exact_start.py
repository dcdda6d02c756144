"""Phase 2 starts exactly at phase 1 (ctm_mlp="keep"), the seed's replacement stays available, and the tick-mixture
readout is the mean of the ticks' distributions."""

import math

import pytest
import torch
from tiny import TINY, tiny_model

from modeling_ctm import CTMConfig, CTMForCausalLM
from modeling_ctm.training.phases import freeze_for_thinking, language_config, start_thinking
from modeling_ctm.training.trainers import evaluate_documents


def _phase1(seed: int = 0) -> CTMForCausalLM:
    torch.manual_seed(seed)
    return CTMForCausalLM(language_config(**{k: v for k, v in TINY.items() if k != "ctm_layers"})).eval()


@pytest.mark.parametrize(
    "readout, readout_norm",
    [("last", "none"), ("most_certain", "none"), ("tick_mixture", "none"), ("most_certain", "rms"),
     ("tick_mixture", "rms_gate"), ("last", "rms_gate")],
)  # fmt: skip
@pytest.mark.parametrize("layers", ["last", "all"])
def test_kept_mlp_conversion_computes_phase_one_exactly(readout, readout_norm, layers, tmp_path):
    language = _phase1()
    ids = torch.randint(1, TINY["vocab_size"], (2, 11))
    expected = language(ids).logits
    folder = tmp_path / "phase1"
    language.save_pretrained(folder)
    for source in (language, folder):
        model = start_thinking(source, ctm_layers=layers, ctm_readout=readout, ctm_readout_norm=readout_norm).eval()
        if readout_norm == "rms_gate":  # the block computes a real output; only the gate at 0 silences it
            assert torch.count_nonzero(model.model.layers[-1].thinking.out_proj.weight) > 0
        assert model.config.ctm_mlp == "keep"
        out = model(ids)
        if readout == "tick_mixture":  # log-probs of the mixture: equal to phase 1's log-softmax
            torch.testing.assert_close(out.logits, expected.log_softmax(-1), atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=0)
        # and the cached generation path agrees too
        generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(generated, language.generate(ids[:1, :4], max_new_tokens=5, do_sample=False))


def test_kept_mlp_is_frozen_and_only_the_block_learns():
    model = start_thinking(_phase1(), ctm_ticks=2)
    layer = model.model.layers[-1]
    assert layer.mlp is not None and layer.thinking is not None
    counts = freeze_for_thinking(model)
    assert not any(p.requires_grad for p in layer.mlp.parameters())
    assert counts["trainable"] == sum(p.numel() for p in layer.thinking.parameters())
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert layer.thinking.out_proj.weight.grad.abs().sum() > 0  # the zero readout receives a gradient and wakes


def test_replacement_is_still_available_and_drops_the_mlp():
    model = start_thinking(_phase1(), ctm_mlp="replace")
    assert model.model.layers[-1].mlp is None
    assert not any(".layers.1.mlp." in name for name in model.state_dict())
    language = _phase1()
    ids = torch.randint(1, TINY["vocab_size"], (1, 7))
    assert not torch.allclose(model.eval()(ids).logits, language(ids).logits, atol=1e-3)  # not an exact start


def test_ctm_mlp_is_validated():
    with pytest.raises(ValueError, match=r"ctm_mlp='drop'.*\('replace', 'keep'\)"):
        CTMConfig(**{**TINY, "ctm_mlp": "drop"})
    with pytest.raises(ValueError, match="ctm_readout"):
        CTMConfig(**{**TINY, "ctm_readout": "mean"})


def test_tick_mixture_readout_is_the_mean_of_the_tick_distributions():
    ids = torch.randint(1, TINY["vocab_size"], (2, 8))
    mixture = tiny_model(ctm_readout="tick_mixture")
    out = mixture(ids, labels=ids)
    last = tiny_model(ctm_readout="last")  # same seed: same weights
    tick_hidden = last.model(ids).tick_hidden_states
    probs = last.lm_head(tick_hidden).float().softmax(-1)  # (B, T, K, V)
    torch.testing.assert_close(out.logits.exp(), probs.mean(2), atol=1e-6, rtol=1e-5)
    assert out.selected_tick is None
    target = ids[:, 1:]
    mean_p = probs.mean(2)[:, :-1].gather(-1, target[..., None])[..., 0]
    assert out.loss_tick_mixture.item() == pytest.approx(-mean_p.log().mean().item(), rel=1e-5)
    # never more than log K worse than the best single tick, per token and so on average
    assert out.loss_tick_mixture <= out.loss_argmin_tick + math.log(3) + 1e-6


def test_documents_are_scored_from_their_first_token():
    class Tokenizer:  # characters as tokens: enough to check the bookkeeping
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [2 + ord(c) % 90 for c in text]}

    language = _phase1()
    texts = ["abc", "hello there", "x"]
    metrics = evaluate_documents(language, Tokenizer(), texts, prefix="p")
    assert metrics["p_tokens"] == 3 + 11 + 1  # every character predicted, the first from the end-of-text token
    expected = 0.0
    for text in texts:
        ids = torch.tensor([[1, *Tokenizer()(text)["input_ids"]]])
        expected += language(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    assert metrics["p_loss"] == pytest.approx(expected / 15, rel=1e-5)
    assert metrics["p_loss_readout"] == metrics["p_loss"]
    thinking = start_thinking(language, ctm_readout="tick_mixture")
    scored = evaluate_documents(thinking, Tokenizer(), texts, prefix="p")
    assert scored["p_loss_readout"] == scored["p_loss_tick_mixture"]
    assert scored["p_loss_final_tick"] == pytest.approx(metrics["p_loss"], abs=1e-5)  # the exact start again


def test_kept_mlp_costs_one_mlp_more_in_flops():
    import flops  # eval/flops.py: eval/ is on the tests' path
    keep = flops.ctm_flops(CTMConfig(**{**TINY, "ctm_layers": "last", "ctm_mlp": "keep"}), 16)
    replace = flops.ctm_flops(CTMConfig(**{**TINY, "ctm_layers": "last", "ctm_mlp": "replace"}), 16)
    assert keep["forward"] - replace["forward"] == flops.mlp_flops(CTMConfig(**TINY))


def test_mixture_loss_trains_what_the_mixture_readout_serves():
    model = tiny_model(
        ctm_layers="last",
        ctm_readout="tick_mixture",
        ctm_loss_mixture_weight=1.0,
        ctm_loss_argmin_weight=0.0,
        ctm_loss_certain_weight=0.0,
    ).train()
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    out = model(ids, labels=ids)
    assert out.loss.item() == pytest.approx(out.loss_tick_mixture.item(), rel=1e-6)
    # ... which is the served logits' own next-token CE
    served = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, TINY["vocab_size"]), ids[:, 1:].reshape(-1)
    )
    assert out.loss.item() == pytest.approx(served.item(), rel=1e-5)
    out.loss.backward()
    assert model.model.layers[-1].thinking.out_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ctm_loss_mixture_weight"):
        CTMConfig(**{**TINY, "ctm_loss_mixture_weight": -1.0})


def test_non_thinking_ffn_freeze_trains_the_block_and_the_mlp_beside_it():
    model = start_thinking(_phase1(), ctm_layers="last")
    counts = freeze_for_thinking(model, "non_thinking_ffn")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    last = model.model.layers[-1]
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.thinking.", "model.layers.1.mlp."))
    }
    assert trainable == expected and any(".layers.1.mlp." in n for n in trainable)
    assert counts["trainable"] == sum(p.numel() for p in [*last.thinking.parameters(), *last.mlp.parameters()])
    assert not model.model.layers[0].mlp.gate_proj.weight.requires_grad


def test_the_tick_mixture_readout_keeps_its_graph_without_labels():
    """Logits of the mixture readout are made of the log-softmax: without labels they must still carry a gradient
    (sleep's consolidation and any custom loss read `logits` and call backward)."""
    model = tiny_model(ctm_readout="tick_mixture").train()
    logits = model(torch.randint(1, 97, (1, 5))).logits
    assert logits.requires_grad
    logits.logsumexp(-1).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "thinking" in n)


def test_gated_readout_wakes_the_block_from_the_first_step():
    """`ctm_readout_norm="rms_gate"`: at step 0 only the gate has a gradient (the exact start), after one step every
    parameter of the block does; with the reference readout the block's own weights get none at step 0."""
    model = start_thinking(_phase1(), ctm_ticks=2, ctm_readout_norm="rms_gate")
    freeze_for_thinking(model)
    block = model.model.layers[-1].thinking
    assert block.out_gate.item() == 0 and block.out_norm is not None
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert block.out_gate.grad.abs().item() > 0
    assert block.synapse.up[-1].weight.grad.abs().sum() == 0  # gate 0: nothing reaches the block yet
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, param in block.named_parameters():
        if name not in ("sync_out.decay", "sync_action.decay", "start_trace") and param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_normalised_readout_reads_unit_size_sync_and_saves(tmp_path):
    model = tiny_model(ctm_layers="last", ctm_readout_norm="rms")
    block = model.model.layers[-1].thinking
    assert block.out_gate is None and torch.equal(block.out_norm.weight, torch.ones(TINY["ctm_n_synch_out"]))
    captured = {}

    def capture(module, args, output):
        captured.setdefault("x", args[0])

    handle = block.out_proj.register_forward_hook(capture)
    model(torch.randint(1, 97, (1, 6)))
    handle.remove()
    rms = captured["x"].pow(2).mean(-1).sqrt()
    assert ((rms > 0.9) & (rms <= 1.0)).all()  # unit size (the eps, rms_norm_eps, shaves a little off); raw is ~1e-2
    gated = tiny_model(ctm_layers="last", ctm_readout_norm="rms_gate")
    with torch.no_grad():
        gated.model.layers[-1].thinking.out_gate.fill_(0.5)
    gated.save_pretrained(tmp_path)
    loaded = CTMForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 97, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, gated(ids).logits, atol=0, rtol=0)


def test_ctm_readout_norm_is_validated_and_defaults_to_the_reference():
    assert CTMConfig(**TINY).ctm_readout_norm == "none"
    block = tiny_model(awake=False).model.layers[0].thinking
    assert block.out_norm is None and block.out_gate is None  # the reference: no new parameters, same state dict
    with pytest.raises(ValueError, match=r"ctm_readout_norm='layer'.*\('none', 'rms', 'rms_gate'\)"):
        CTMConfig(**{**TINY, "ctm_readout_norm": "layer"})


def test_readout_norm_parameters_come_out_of_init_weights():
    """Built on the meta device with nothing loaded: the gate, the norm gain and the random out_proj are all filled."""
    from tiny import tiny_config

    model = CTMForCausalLM.from_pretrained(None, config=tiny_config(ctm_readout_norm="rms_gate"), state_dict={})
    for layer in model.model.layers:
        block = layer.thinking
        assert block.out_gate.device.type == "cpu" and block.out_gate.item() == 0.0
        assert torch.equal(block.out_norm.weight, torch.ones_like(block.out_norm.weight))
        bound = 3**0.5 * TINY["ctm_n_synch_out"] ** -0.5 * 0.68
        assert 0 < block.out_proj.weight.abs().max() <= bound
