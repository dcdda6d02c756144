"""The fast-weight token memory (`ctm_token_memory="token"`) and the delta rule that writes it: an empty
memory computes exactly what the model without one does, a write under one token moves only the positions holding
that token, a fact written twice is not doubled, the running-mean step averages a slot's errors, each slot is bounded
on its own, and the memory survives a save and a load, cached decoding included."""

import pytest
import torch
from tiny import tiny_model

from modeling_ctm import CTMConfig, CTMForCausalLM
from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig


def memory_config(**overrides) -> PlasticityConfig:
    fields = dict(rule="delta", targets=["token_memory"], gate="none", learning_rate=1.0, max_step=50.0,
                  max_drift=50.0)  # fmt: skip
    return PlasticityConfig(**{**fields, **overrides})


def memory_model(**overrides) -> CTMForCausalLM:
    torch.manual_seed(0)
    model = tiny_model(ctm_layers="last", ctm_token_memory="token", **overrides).eval()
    with torch.no_grad():  # a head as loud as a trained one's, so one step moves the prediction visibly
        model.lm_head.weight.mul_(30.0)
    return model


def log_probs(model, ids):
    with torch.no_grad():
        return model(ids).logits.log_softmax(-1)


def test_an_empty_memory_computes_exactly_the_model_without_one():
    torch.manual_seed(0)
    plain = tiny_model(ctm_layers="last")
    with_memory = CTMForCausalLM(CTMConfig(**{**plain.config.to_dict(), "ctm_token_memory": "token"}))
    result = with_memory.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["model.token_memory.weight"] and not result.unexpected_keys
    assert torch.count_nonzero(with_memory.model.token_memory.weight) == 0
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, with_memory(ids).logits)
    assert CTMConfig().ctm_token_memory == "none" and plain.model.token_memory is None
    # in place, as a session does for a checkpoint from before phase 4: the same logits, out of the optimiser
    with torch.no_grad():
        before = plain(ids).logits
        memory = plain.add_token_memory()
        assert torch.equal(plain(ids).logits, before)
    assert plain.config.ctm_token_memory == "token" and not memory.weight.requires_grad
    assert plain.add_token_memory() is memory


def test_the_field_is_validated_and_inputs_embeds_are_refused():
    with pytest.raises(ValueError, match=r"ctm_token_memory.*'none', 'token'"):
        CTMConfig(ctm_token_memory="slots")
    model = memory_model()
    with pytest.raises(ValueError, match="ctm_token_memory='token' reads input_ids"):
        model(inputs_embeds=torch.randn(1, 3, model.config.hidden_size))
    with pytest.raises(ValueError, match="ctm_token_memory='token'"):
        HebbianPlasticity(tiny_model(ctm_layers="last"), memory_config())
    with pytest.raises(ValueError, match="delta_step='running_mean' needs targets=\\['token_memory'\\]"):
        PlasticityConfig(rule="delta", targets=["mlp"], delta_step="running_mean")
    with pytest.raises(ValueError, match="'token_memory' are targets of rule='delta' only"):
        PlasticityConfig(targets=["token_memory"])


def test_a_write_moves_the_told_successor_and_only_where_its_key_token_stands():
    model = memory_model()
    told, other = torch.tensor([[5, 17]]), torch.tensor([[6, 18, 9, 30]])
    told_before, other_before = log_probs(model, told), log_probs(model, other)
    rule = HebbianPlasticity(model, memory_config()).enable()
    with torch.no_grad():
        model(told)
    rule.disable()
    assert rule.apply()["applied"]
    written = torch.count_nonzero(model.model.token_memory.weight.abs().sum(-1))
    assert written == 1  # only slot 5 (the token before the value 17)
    assert log_probs(model, told)[0, 0, 17] > told_before[0, 0, 17] + 1.0
    assert torch.equal(log_probs(model, other), other_before)  # token 5 is nowhere in it: exactly unchanged
    # the same key in another context reads the same slot: the successor is predicted there too
    elsewhere = torch.tensor([[9, 30, 5]])
    assert log_probs(model, elsewhere)[0, -1].argmax() == 17


def test_writing_a_fact_twice_does_not_double_it():
    model = memory_model()
    rule = HebbianPlasticity(model, memory_config(learning_rate=2.0)).enable()
    told = torch.tensor([[5, 17]])
    steps = []
    for _ in range(3):
        before = model.model.token_memory.weight.detach().clone()
        with torch.no_grad():
            model(told)
        rule.apply()
        steps.append(float((model.model.token_memory.weight.detach() - before).norm()))
    # the error it corrects shrinks as the prediction comes right: each write smaller than the one before
    assert steps[0] > steps[1] > steps[2] and steps[2] < 0.5 * steps[0]


def test_the_running_mean_step_averages_a_slots_errors():
    model = memory_model()
    ids = torch.tensor([[5, 17, 5, 23, 5, 40]])
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)[0]
    rule = HebbianPlasticity(model, memory_config(delta_step="running_mean")).enable()
    with torch.no_grad():
        model(ids)
    rule.apply()
    head = model.lm_head.weight.detach().double()
    errors = [head[y] - probs[t].double() @ head for t, y in ((0, 17), (2, 23), (4, 40))]
    # occurrence k of token 5 steps by 1/k (the running mean of the slot's errors; within one forward pass every
    # error is read before any write lands)
    expected = errors[0] + errors[1] / 2 + errors[2] / 3
    torch.testing.assert_close(model.model.token_memory.weight[5].double(), expected, rtol=1e-5, atol=1e-6)
    assert rule.key_sums[rule.targets[0].name][5] == 3


def test_each_slot_is_bounded_on_its_own():
    model = memory_model()
    rule = HebbianPlasticity(model, memory_config(learning_rate=1.0, max_step=50.0, max_drift=0.5)).enable()
    with torch.no_grad():
        model(torch.tensor([[5, 17]]))
    rule.apply()
    fact = model.model.token_memory.weight[5].detach().clone()
    for _ in range(5):  # many writes under another token
        with torch.no_grad():
            model(torch.tensor([[9, 30, 9, 31, 9, 32]]))
        rule.apply()
    assert torch.equal(model.model.token_memory.weight[5], fact)
    reference = model.lm_head.weight.detach().double().norm(dim=-1).pow(2).mean().sqrt()
    slots = model.model.token_memory.weight.detach().double().norm(dim=-1)
    assert float(slots.max()) <= 0.5 * float(reference) * (1 + 1e-6)
    assert rule.norm_ratios()[rule.targets[0].name] == pytest.approx(float(slots.max() / reference))


def test_the_memory_survives_a_save_and_a_load_and_cached_decoding_reads_it(tmp_path):
    model = memory_model()
    rule = HebbianPlasticity(model, memory_config()).enable()
    with torch.no_grad():
        model(torch.tensor([[5, 17]]))
    rule.apply()
    model.save_pretrained(tmp_path)
    loaded = CTMForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.token_memory.weight, model.model.token_memory.weight)
    ids = torch.tensor([[3, 8, 5, 11, 5]])
    with torch.no_grad():
        full = loaded(ids).logits
        out = loaded(ids[:, :2], use_cache=True)
        steps = [out.logits]
        for t in range(2, ids.shape[1]):
            out = loaded(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_session_does_not_write_the_turn_boundary_after_the_models_own_reply():
    """The model's last reply token reaches the model only with the user's next message; its successor there is a
    turn boundary, not something the user said after it, so the rule reads no key at that position."""
    from modeling_ctm.memory.session import CTMOnlineSession, OnlineConfig
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["Velmora Quenth.", "Tarsin Brolk ran.", "a dog ran in the park."] * 30, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), ctm_layers="last", ctm_carry="chunk", ctm_chunk_size=4,
                       ctm_token_memory="token", max_position_embeddings=256).eval()  # fmt: skip
    rule = HebbianPlasticity(model, memory_config())
    session = CTMOnlineSession(model, tokenizer, plasticity=rule, config=OnlineConfig(max_new_tokens=2))
    messages = ["Velmora Quenth.", "Tarsin Brolk ran."]
    lengths = [len(tokenizer(m, add_special_tokens=False).input_ids) for m in messages]
    for message in messages:
        session.say(message)
    # per message: its transitions but the last (whose value the model reads while generating); nothing keyed by
    # the reply
    assert rule.key_counts[rule.targets[0].name] == sum(n - 2 for n in lengths)
    session.end()
