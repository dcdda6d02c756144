"""The CTM language model as a transformers model: shapes, loading, loss, numerics, probe."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.processes import run_without_the_package
from tiny import TINY, tiny_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from modeling_ctm import CTMConfig, CTMForCausalLM, CTMModel
from modeling_ctm.modeling_ctm import CTMSynchronisation


def _ids(batch=2, length=7, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator)


# -- shapes, dtypes, determinism --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["none", "last", "all", [0]])
def test_shapes_and_dtypes(layers):
    model = tiny_model(ctm_layers=layers)
    ids = _ids()
    out = model(ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 7, 97) and out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 7, 32) for h in out.hidden_states)
    if model.model.last_layer_thinks:
        K = model.config.ctm_ticks
        assert out.certainty.shape == (2, 7, K) and out.certainty.dtype == torch.float32
        assert ((out.certainty >= -1e-5) & (out.certainty <= 1 + 1e-5)).all()
        assert out.selected_tick.shape == (2, 7) and out.selected_tick.dtype == torch.long
        assert out.tick_losses.shape == (K,) and out.tick_argmin_fraction.sum().item() == pytest.approx(1.0)
        # the three readouts are reported side by side; argmin is the optimistic one
        assert out.loss_argmin_tick <= out.loss_final_tick + 1e-6
        assert out.loss_argmin_tick <= out.loss_most_certain_tick + 1e-6
    else:
        assert out.certainty is None and out.selected_tick is None


def test_determinism_in_train_and_eval():
    model = tiny_model()
    ids = _ids()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert torch.equal(model(ids, labels=ids).loss, model(ids, labels=ids).loss)


def test_plain_config_is_numerically_a_llama():
    """With no thinking layers the model is a Llama: same weights, same logits (same state-dict names too)."""
    model = tiny_model(ctm_layers="none", tie_word_embeddings=False)
    llama_config = LlamaConfig(
        **{k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")},
        num_attention_heads=TINY["num_attention_heads"],
        num_key_value_heads=TINY["num_key_value_heads"],
        tie_word_embeddings=False,
        rms_norm_eps=model.config.rms_norm_eps,
    )
    llama = LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)


def test_inputs_embeds_match_input_ids_and_logits_to_keep():
    model = tiny_model()
    ids = _ids()
    by_ids = model(ids).logits
    by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(by_ids, by_embeds)
    last = model(ids, logits_to_keep=1)
    assert last.logits.shape == (2, 1, 97)
    torch.testing.assert_close(last.logits, by_ids[:, -1:])


def test_tuple_output_equals_dict_output():
    model = tiny_model()
    ids = _ids()
    as_dict = model(ids, use_cache=False)
    as_tuple = model(ids, use_cache=False, return_dict=False)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)


# -- saving and loading -------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "modeling_ctm.py", "configuration_ctm.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    # every model file travels as remote code: a sibling the model file does not import with a single dot is not copied
    siblings = {path.name for path in Path(sys.modules[CTMForCausalLM.__module__].__file__).parent.glob("*_ctm.py")}
    assert {"checks_ctm.py", "cache_ctm.py", "io_ctm.py"} <= siblings <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_ctm.CTMForCausalLM"
    assert auto_map["AutoModel"] == "modeling_ctm.CTMModel"

    ids = _ids()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CTMForCausalLM)
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
    for (name, buffer), (_, buffer2) in zip(model.named_buffers(), reloaded.named_buffers()):
        assert torch.equal(buffer, buffer2), name
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CTMConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), CTMModel)


@pytest.mark.slow
def test_remote_code_load_without_the_package(tmp_path):
    """`trust_remote_code=True` loads the saved folder in a fresh process where `modeling_ctm` cannot be imported."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    ids = _ids()
    from safetensors.torch import save_file  # the expected logits travel as safetensors, not pickle

    save_file({"ids": ids, "logits": model(ids).logits.contiguous()}, str(tmp_path / "expected.safetensors"))
    run_without_the_package(
        f"""
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
            raise SystemExit("loaded without trust_remote_code")
        except ValueError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        logits = model(expected["ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)  # float32, another process
        print("REMOTE_OK")
        """,
        tmp_path,
    )


def test_every_parameter_and_buffer_initialised_when_missing():
    """transformers 5 builds on the meta device: whatever the checkpoint lacks must come out of `_init_weights`."""
    config = tiny_config(ctm_decay_init_range=[0.5, 2.0])
    model = CTMForCausalLM.from_pretrained(None, config=config, state_dict={})
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cpu", name
        assert torch.isfinite(tensor.float()).all(), name
    D = config.hidden_size
    for layer in model.model.layers:
        block = layer.thinking
        assert torch.count_nonzero(block.out_proj.weight) == 0  # a fresh block adds nothing
        assert block.start_state.abs().max() <= D**-0.5 and block.start_state.abs().max() > 0
        for sync in (block.sync_out, block.sync_action):
            assert ((sync.left >= 0) & (sync.left <= sync.right) & (sync.right < D)).all()
            pairs = set(zip(sync.left.tolist(), sync.right.tolist()))
            assert len(pairs) == sync.left.numel()  # distinct pairs
            assert ((sync.decay >= 0.5) & (sync.decay <= 2.0)).all()
    expected = 1.0 / (10000.0 ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)


# -- config validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(ctm_layers=[2]), "ctm_layers"),
        (dict(ctm_layers=[-3]), "ctm_layers"),
        (dict(ctm_layers=[]), "ctm_layers"),
        (dict(ctm_layers="first"), "ctm_layers"),
        (dict(ctm_ticks=0), "ctm_ticks"),
        (dict(ctm_memory_length=0), "ctm_memory_length"),
        (dict(ctm_n_synch_out=32 * 33 // 2 + 1), "ctm_n_synch_out"),
        (dict(ctm_n_synch_action=0), "ctm_n_synch_action"),
        (dict(ctm_synapse_depth=3), "ctm_synapse_depth"),
        (dict(ctm_synapse_depth=0), "ctm_synapse_depth"),
        (dict(ctm_nlm_hidden_size=0), "ctm_nlm_hidden_size"),
        (dict(ctm_attention_heads=3), "ctm_attention_heads"),
        (dict(ctm_readout="first"), "ctm_readout"),
        (dict(ctm_carry="token"), "ctm_carry"),
        (dict(ctm_carry="chunk"), "ctm_chunk_size"),
        (dict(ctm_carry="chunk", ctm_chunk_size=0), "ctm_chunk_size"),
        (dict(ctm_decay_init_range=[2.0, 1.0]), "ctm_decay_init_range"),
        (dict(ctm_decay_init_range=[0.0, 16.0]), "ctm_decay_init_range"),
        (dict(ctm_loss_argmin_weight=-1.0), "ctm_loss_argmin_weight"),
        (dict(ctm_loss_argmin_weight=0.0, ctm_loss_certain_weight=0.0), "ctm_loss_argmin_weight"),
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"CTMConfig\.{field}=.* is invalid: .*"):
        tiny_config(**overrides)


def test_config_roundtrip_and_layer_indices():
    config = tiny_config(ctm_layers=[-1])
    assert config.ctm_layer_indices == [1]
    again = CTMConfig.from_dict(config.to_dict())
    assert again.ctm_layer_indices == [1] and again.ctm_decay_init_range == [0.0, 1.0]
    assert tiny_config(ctm_layers="none").ctm_layer_indices == []
    assert tiny_config(ctm_layers="all").ctm_layer_indices == [0, 1]


# -- gradients and loss -------------------------------------------------------------------------------------------------


def test_every_tick_receives_gradient():
    """A loss read at any tick reaches every thinking parameter, and the tick embeddings of exactly ticks <= k."""
    model = tiny_model(ctm_layers="last").train()
    block = model.model.layers[-1].thinking
    ids = _ids()
    grads = []
    for k in range(model.config.ctm_ticks):
        model.zero_grad()
        out = model.model(ids, return_tick_states=True)
        tick_logits = model.lm_head(out.tick_hidden_states[:, :, k])
        F.cross_entropy(tick_logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
        grads.append(block.tick_embed.grad.clone())
        for name, param in block.named_parameters():
            # the action synchronisation updated at tick 0 is first read by tick 1's query
            if name == "tick_embed" or (k == 0 and name == "sync_action.decay"):
                continue
            assert param.grad is not None and param.grad.abs().sum() > 0, (k, name)
    # the loss at tick k reaches the tick embeddings of ticks <= k and none after k
    for k, grad in enumerate(grads):
        assert (grad[: k + 1].abs().sum(-1) > 0).all(), k
        assert grad[k + 1 :].abs().sum() == 0, k


def test_multi_tick_loss_equals_hand_recomputation():
    model = tiny_model(ctm_layers="last", ctm_loss_tick_aux_weight=0.3)
    ids = _ids(batch=2, length=9)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)

    _, layers = model.probe(ids)
    layer = layers[model.config.num_hidden_layers - 1]
    K = model.config.ctm_ticks
    total, count = 0.0, 0
    final, certain_sum, argmin_sum = 0.0, 0.0, 0.0
    for b in range(2):
        for t in range(8):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            ce, cert = [], []
            for k in range(K):
                residual = layer.residual[b, t] + layer.tick_outputs[b, t, k]
                logits = model.lm_head(model.model.norm(residual))
                probs = logits.softmax(-1)
                ce.append(-torch.log(probs[target]).item())
                cert.append(1 + (probs * probs.log()).sum().item() / torch.log(torch.tensor(97.0)).item())
            best = min(range(K), key=lambda k: ce[k])
            sure = max(range(K), key=lambda k: cert[k])
            total += 0.5 * ce[best] + 0.5 * ce[sure] + 0.3 * sum(ce) / K
            final += ce[-1]
            certain_sum += ce[sure]
            argmin_sum += ce[best]
            count += 1
    assert out.loss.item() == pytest.approx(total / count, rel=1e-4)
    assert out.loss_final_tick.item() == pytest.approx(final / count, rel=1e-4)
    assert out.loss_most_certain_tick.item() == pytest.approx(certain_sum / count, rel=1e-4)
    assert out.loss_argmin_tick.item() == pytest.approx(argmin_sum / count, rel=1e-4)


def test_loss_honours_shift_labels_and_num_items_in_batch():
    for layers in ("none", "last"):
        model = tiny_model(ctm_layers=layers)
        ids = _ids()
        shifted = torch.roll(ids, -1, dims=1)
        shifted[:, -1] = -100
        reference = model(ids, labels=ids).loss
        # shift_labels alone decides the loss; labels are then ignored
        via_shift = model(ids, labels=torch.full_like(ids, 5), shift_labels=shifted).loss
        torch.testing.assert_close(via_shift, reference)
        n = (shifted != -100).sum()
        torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=2 * n).loss, reference / 2)


def test_plain_cross_entropy_when_last_layer_does_not_think():
    model = tiny_model(ctm_layers=[0])
    ids = _ids()
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.tick_losses is None


def test_readout_setting_picks_the_reported_tick():
    ids = _ids()
    last = tiny_model(ctm_readout="last")(ids)
    assert (last.selected_tick == last.certainty.shape[-1] - 1).all()
    certain = tiny_model(ctm_readout="most_certain")(ids)
    assert torch.equal(certain.selected_tick, certain.certainty.argmax(-1))


# -- numerics: fp32 accumulators, the decay clamp -----------------------------------------------------------------------


def test_sync_accumulators_stay_fp32_under_bf16_compute():
    """bf16 would saturate beta at 256 (r = 1); in fp32 it counts every tick exactly."""
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=1, ctm_decay_init_range=[0.0, 0.0]).to(torch.bfloat16)
    ids = _ids(batch=1, length=100)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.dtype == torch.bfloat16
    for idx in model.config.ctm_layer_indices:
        last = out.cache.layers[idx].last
        assert last.state.dtype == torch.bfloat16
        for accumulator in (last.alpha_out, last.beta_out, last.alpha_action, last.beta_action):
            assert accumulator.dtype == torch.float32
        # 1 (seed) + 100 tokens x 3 ticks, carried token to token
        assert torch.equal(last.beta_out, torch.full_like(last.beta_out, 301.0))


def test_a_decay_pushed_below_zero_recovers():
    sync = CTMSynchronisation(hidden_size=8, n_pairs=4)
    with torch.no_grad():
        sync.decay.copy_(torch.tensor([-0.5, -0.1, 0.3, 20.0]))
    rates = sync.decay_rates()
    torch.testing.assert_close(rates, torch.exp(-torch.tensor([0.0, 0.0, 0.3, 15.0])))
    # a loss that wants faster forgetting (larger decay) reaches the out-of-range decays below zero ...
    rates.sum().backward()
    assert (sync.decay.grad[:3] < 0).all()
    assert sync.decay.grad[3] == 0  # ... but does not push the one above the range further up
    # ... and one that wants r > 1 does not drift them further out
    sync.decay.grad = None
    (-sync.decay_rates().sum()).backward()
    assert (sync.decay.grad[:2] == 0).all() and sync.decay.grad[2] > 0
    # a plain clamp (the reference) would have frozen them: zero gradient below the range
    frozen = torch.tensor([-0.5], requires_grad=True)
    torch.exp(-frozen.clamp(0, 15)).sum().backward()
    assert frozen.grad.item() == 0
    # and a few steps of gradient descent bring them back into play
    optimizer = torch.optim.SGD(sync.parameters(), lr=1.0)
    for _ in range(5):
        optimizer.zero_grad()
        sync.decay_rates().sum().backward()
        optimizer.step()
    assert (sync.decay[:2] > 0).all()


# -- batching, probe, checkpointing, generate ----------------------------------------------------------------------------


@pytest.mark.parametrize("carry", [dict(), dict(ctm_carry="chunk", ctm_chunk_size=3)])
def test_batch_row_equals_that_row_alone(carry):
    model = tiny_model(ctm_readout="last", **carry)
    ids = _ids(batch=3, length=8)
    batched = model(ids)
    for row in range(3):
        alone = model(ids[row : row + 1])
        torch.testing.assert_close(batched.logits[row : row + 1], alone.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(batched.certainty[row : row + 1], alone.certainty, rtol=0, atol=1e-5)


def test_probe_reports_every_layer_and_tick_and_intervention_changes_the_output():
    model = tiny_model()
    ids = _ids()
    outputs, layers = model.probe(ids)
    K = model.config.ctm_ticks
    assert sorted(layers) == [0, 1]
    for layer in layers.values():
        assert layer.state.shape == (2, 7, K, 32)
        assert layer.state_delta.shape == (2, 7, K) and (layer.state_delta > 0).all()
        assert layer.sync_out.shape == (2, 7, K, 16)
        assert layer.certainty.shape == (2, 7, K)
    # the last layer's logit-lens certainty is the model's own certainty
    torch.testing.assert_close(layers[1].certainty, outputs.certainty)
    torch.testing.assert_close(
        layers[1].state_delta[:, :, 1], (layers[1].state[:, :, 1] - layers[1].state[:, :, 0]).norm(dim=-1)
    )
    # same output without intervention; replacing the state at tick 1 of layer 1 changes what follows
    torch.testing.assert_close(outputs.logits, model(ids).logits)
    calls = []

    def silence(layer_idx, tick, state):
        calls.append((layer_idx, tick))
        return torch.zeros_like(state) if (layer_idx, tick) == (1, 1) else None

    changed, changed_layers = model.probe(ids, intervention=silence)
    assert (1, 1) in calls and len(calls) == 2 * K
    assert torch.count_nonzero(changed_layers[1].state[:, :, 1]) == 0
    torch.testing.assert_close(changed_layers[0].state, layers[0].state)
    assert not torch.allclose(changed.logits, outputs.logits)


@pytest.mark.parametrize("mode", ["layer", "tick"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    ids = _ids()
    reference = tiny_model().train()
    reference(ids, labels=ids).loss.backward()
    if mode == "layer":
        model = tiny_model().train()
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model = tiny_model(ctm_tick_checkpointing=True).train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_layer_checkpointing_refuses_to_drop_a_carried_state():
    model = tiny_model(ctm_carry="chunk", ctm_chunk_size=2).train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    from modeling_ctm import CTMCache

    with pytest.raises(ValueError, match="ctm_tick_checkpointing"):
        model(_ids(), cache=CTMCache(model.config), use_cache=True)


def test_generate_runs_and_assisted_decoding_is_refused():
    model = tiny_model()
    ids = _ids(batch=1)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 12)
    # refused by the model itself, before transformers' own checks, with the reason
    with pytest.raises(ValueError, match="assisted decoding .* stateful"):
        model.generate(ids, max_new_tokens=3, assistant_model=tiny_model(seed=1), pad_token_id=0)
    with pytest.raises(ValueError, match="assisted decoding"):
        model.generate(ids, max_new_tokens=3, prompt_lookup_num_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="assisted decoding"):  # a generation config given positionally
        model.generate(ids, GenerationConfig(max_new_tokens=3, prompt_lookup_num_tokens=2, pad_token_id=0))
    with pytest.raises(ValueError, match="'group_beam_search' is not supported"):
        model.generate(ids, max_new_tokens=3, num_beams=4, num_beam_groups=2, diversity_penalty=1.0, pad_token_id=0)


def test_eager_and_sdpa_attention_agree_and_eager_returns_attentions():
    ids = _ids()
    # the last-tick readout: the most-certain one is an argmax over ticks, which a 1e-7 difference can flip on a tie
    sdpa = tiny_model(ctm_readout="last")
    eager = tiny_model(attn_implementation="eager", ctm_readout="last")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    out = eager(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, sdpa(ids).logits, rtol=0, atol=1e-5)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 7, 7)
    # causal: nothing attends to the future
    assert torch.count_nonzero(out.attentions[0].triu(1)) == 0
