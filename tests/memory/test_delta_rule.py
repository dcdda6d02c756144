"""The delta rule of `HebbianPlasticity`: it stores and retrieves orthogonal keys exactly, leaves an
unrelated key's output as it was, does not double a fact written twice, centres its keys, is validated, and leaves the
default Hebbian rule as it was."""

import pytest
import torch
from tiny import tiny_model

from modeling_ctm.memory.plasticity import (
    HebbianPlasticity,
    PlasticityConfig,
    centred_keys,
    delta_write_map,
    memory_held_bytes,
)


def delta_config(**overrides) -> PlasticityConfig:
    # a wide band: these tests look at the rule itself, not at the homeostasis that may shorten its edit
    fields = dict(rule="delta", targets=["out_proj"], presynaptic="centered", gate="none", band=0.9, max_drift=50.0,
                  max_step=50.0)  # fmt: skip
    return PlasticityConfig(**{**fields, **overrides})


def loud_model(**overrides):
    """A tiny model whose readout is as loud as the residual stream (raw S_out is ~1e-2 here): a value the size of the
    residual stream then fits in the band around its anchor."""
    model = tiny_model(ctm_layers="last", **overrides)
    with torch.no_grad():
        model.model.layers[-1].thinking.out_proj.weight.mul_(100.0)
    return model


def write(memory, keys, values, betas=None, mean=None):
    betas = torch.ones(keys.shape[0]) if betas is None else betas
    Q, R = delta_write_map(keys, values, betas, mean)
    return memory @ Q + R


def test_orthogonal_keys_are_stored_exactly_and_an_unrelated_key_is_unchanged():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    keys, unrelated = basis[:8] * 3.0, basis[10] * 2.0  # not unit length: the rule normalises
    values = torch.randn(8, 5, dtype=torch.float64)
    before = torch.randn(5, 12, dtype=torch.float64)  # a memory holding something already
    after = write(before, keys, values)
    torch.testing.assert_close(after @ keys.T, values.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(after @ unrelated, before @ unrelated, rtol=0, atol=1e-12)


def test_writing_a_fact_twice_does_not_double_it():
    torch.manual_seed(1)
    keys, values = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    once = write(torch.zeros(4, 10, dtype=torch.float64), keys[:1], values[:1])
    twice = write(once, keys[:1], values[:1])
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-12)
    torch.testing.assert_close(once @ keys[0], values[0], rtol=0, atol=1e-12)
    # a half step moves half the way to the target: the rule corrects the prediction, it does not add the value
    half = write(once, keys[:1], 3 * values[:1], betas=torch.tensor([0.5]))
    torch.testing.assert_close(half @ keys[0], 2 * values[0], rtol=0, atol=1e-12)


def test_centring_makes_keys_that_share_a_mean_direction_independent():
    torch.manual_seed(2)
    shared = torch.randn(16, dtype=torch.float64) * 10
    basis = torch.linalg.qr(torch.cat([shared[:, None], torch.randn(16, 15, dtype=torch.float64)], 1))[0]
    parts = basis[:, 1:7].T  # orthonormal, and orthogonal to the shared direction
    keys = shared + parts  # raw cosines near 1: every key is mostly the shared direction
    values = torch.randn(6, 3, dtype=torch.float64)
    raw_cos = torch.nn.functional.normalize(keys, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    assert raw_cos[~torch.eye(6, dtype=torch.bool)].min() > 0.95
    mean = shared  # the running mean key of a stream whose patterns share this direction
    centred = torch.nn.functional.normalize(centred_keys(keys, mean), dim=-1)
    assert (centred @ centred.T - torch.eye(6, dtype=torch.float64)).abs().max() < 1e-9
    memory = write(torch.zeros(3, 16, dtype=torch.float64), keys, values, mean=mean)
    torch.testing.assert_close(memory @ keys.T, values.T, rtol=0, atol=1e-9)
    # without centring the later writes overwrite the earlier facts
    raw = write(torch.zeros(3, 16, dtype=torch.float64), keys, values)
    assert (raw @ keys[0] - values[0]).norm() > 0.1 * values[0].norm()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rule="oja"), "PlasticityConfig.rule"),
        (dict(rule="delta"), "PlasticityConfig.targets"),  # the default targets include the synapse
        (dict(rule="delta", targets=["out_proj"], presynaptic="whitened"), "PlasticityConfig.presynaptic"),
        (dict(rule="delta", targets=["out_proj"], learning_rate=1.5), "PlasticityConfig.learning_rate"),
        (dict(delta_target_norm=0.0), "PlasticityConfig.delta_target_norm"),
    ],
)
def test_bad_delta_options_raise_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        PlasticityConfig(**fields)


def test_the_default_rule_is_the_hebbian_one_and_old_configs_load_as_it():
    assert PlasticityConfig().rule == "hebbian"
    old = PlasticityConfig().to_dict()
    del old["rule"], old["delta_target_norm"]  # a config saved before the field existed
    assert PlasticityConfig.from_dict(old) == PlasticityConfig()
    model = tiny_model(ctm_layers="last", ctm_readout="last")
    rule = HebbianPlasticity(model)
    assert not rule.key_sums and all(":Q" not in name for name, _ in rule._layout)


def readout_of(model, rule, ids):
    """The rule's edit applied to the readout synchronisation of every position of `ids` at the last tick."""
    block = model.model.layers[rule.targets[0].layer_idx].thinking
    captured = {}
    handle = block.out_proj.register_forward_pre_hook(lambda module, args: captured.__setitem__("s", args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    edit = rule.edits()[rule.targets[0].name]
    return captured["s"].to(torch.float64) @ edit.T  # (1, T, D): the readout's last call is the last tick


def test_on_a_model_a_written_fact_is_returned_and_a_second_write_changes_nothing():
    model = loud_model(ctm_readout="last")
    with torch.no_grad():
        before = model(torch.tensor([[5, 17]])).logits[0, 0].log_softmax(-1)[17]
    rule = HebbianPlasticity(model, delta_config()).enable()
    model(torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(0)))  # calibrate the key mean
    rule.reset_statistics()
    ids = torch.tensor([[5, 17]])  # one key (position 0) and its value (token 17)
    with torch.no_grad():
        prior = model(ids).logits[0, 0].float().log_softmax(-1)  # the prediction the write is made against
    rule.reset_statistics()
    model(ids)
    written = rule.last_write["keys"]
    assert written.shape[0] == 1 and rule.last_write["positions"].tolist() == [[0, 0, 0]]
    report = rule.apply()
    assert report["applied"]
    with torch.no_grad():
        after = model(ids).logits[0, 0].log_softmax(-1)[17]
    assert after > before + 0.1  # the value's log-probability went up at its key
    assert report["norm_ratio"][rule.targets[0].name] < 1.9  # inside the band: the edit was not shortened
    # what the edit returns at the key is the value: along W^T (onehot - p) of the next token (through the norm's gain)
    head, gain = model.lm_head.weight.detach().double(), model.model.norm.weight.detach().double()
    expected = prior.exp().double() @ head
    direction = torch.nn.functional.normalize((head[17] - expected) * gain, dim=0)
    stored = readout_of(model, rule, ids)[0, 0]
    assert torch.nn.functional.cosine_similarity(stored, direction, dim=0) > 1 - 1e-6
    first = rule.edits()[rule.targets[0].name].clone()
    model(ids)
    rule.apply()
    second = rule.edits()[rule.targets[0].name]
    # the key mean moved a little with the second read, so the key is not bit-identical: the change stays tiny
    assert (second - first).norm() < 1e-2 * first.norm()
    rule.disable()


def test_on_a_model_a_second_fact_leaves_the_first_nearly_unchanged_and_state_round_trips():
    model = loud_model(ctm_readout="last")
    rule = HebbianPlasticity(model, delta_config()).enable()
    model(torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(0)))  # calibrate the key mean
    rule.reset_statistics()
    assert rule.key_mean() is not None and rule.edits()[rule.targets[0].name].abs().max() == 0
    first, second = torch.tensor([[5, 17]]), torch.tensor([[40, 23]])
    model(first)
    rule.apply()
    out_first = readout_of(model, rule, first)[0, 0]
    model(second)
    key_first = rule.last_write["keys"]
    rule.apply()
    moved = (readout_of(model, rule, first)[0, 0] - out_first).norm() / out_first.norm()
    tensors, meta = rule.state()
    assert any(name.startswith("key_sum.") for name in tensors) and memory_held_bytes(rule) > 0
    fresh = HebbianPlasticity(model, delta_config())
    fresh.load_state(tensors, meta)
    torch.testing.assert_close(fresh.key_mean(), rule.key_mean())
    # the interference is the cosine of the two centred keys: what the rule leaves to the representations
    assert moved < 1.0 and key_first.shape[1] == model.config.ctm_n_synch_out
    rule.disable()


def test_delta_tick_mixture_writes_every_tick():
    model = tiny_model(ctm_layers="last", ctm_readout="tick_mixture")
    rule = HebbianPlasticity(model, delta_config()).enable()
    model(torch.tensor([[5, 17, 9]]))
    assert rule.last_write["positions"].shape[0] == 2 * model.config.ctm_ticks
    rule.disable()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rule="delta", targets=["out_proj", "mlp"]), "PlasticityConfig.targets"),
        (dict(rule="hebbian", targets=["mlp"]), "'mlp' and 'token_memory' are targets of rule='delta' only"),
    ],
)
def test_the_mlp_target_is_a_delta_rule_target_alone(fields, message):
    with pytest.raises(ValueError, match=message):
        PlasticityConfig(**fields)


def test_the_mlp_target_needs_the_mlp_kept_beside_the_block():
    with pytest.raises(ValueError, match="ctm_mlp='keep'"):
        HebbianPlasticity(tiny_model(ctm_layers="last", ctm_mlp="replace"), delta_config(targets=["mlp"]))


def test_on_a_model_the_mlp_write_is_keyed_by_the_mlp_hidden_activation_and_returns_the_value():
    model = tiny_model(ctm_layers="last", ctm_mlp="keep", ctm_readout="last")
    rule = HebbianPlasticity(model, delta_config(targets=["mlp"])).enable()
    assert [t.kind for t in rule.targets] == ["mlp"] and rule.targets[0].name.endswith("mlp.down_proj.weight")
    model(torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(0)))  # calibrate the key mean
    rule.reset_statistics()
    ids = torch.tensor([[5, 17]])  # one key (position 0) and its value (token 17)
    down = model.model.layers[-1].mlp.down_proj
    captured = {}
    handle = down.register_forward_hook(lambda module, args, out: captured.__setitem__("h", args[0].detach()))
    with torch.no_grad():
        prior = model(ids).logits[0, 0].float().log_softmax(-1)
    rule.reset_statistics()
    mean = rule.key_mean()  # the keys of a pass are centred by the mean of the keys read before it
    model(ids)
    written_key = rule.last_write["keys"][0]
    assert rule.last_write["keys"].shape == (1, model.config.intermediate_size)  # one key: position 0, one "tick"
    assert rule.apply()["applied"]
    with torch.no_grad():
        after = model(ids).logits[0, 0].float().log_softmax(-1)[17]
    handle.remove()
    assert after > prior[17] + 0.1
    # the edit returns the value at the key: along W^T (onehot - p) of the next token, through the final norm's gain
    head, gain = model.lm_head.weight.detach().double(), model.model.norm.weight.detach().double()
    direction = torch.nn.functional.normalize((head[17] - prior.exp().double() @ head) * gain, dim=0)
    stored = captured["h"][0, 0].double() @ rule.edits()[rule.targets[0].name].T
    assert torch.nn.functional.cosine_similarity(stored, direction, dim=0) > 1 - 1e-6
    # a key orthogonal to the (centred) written one gets nothing from the edit
    written = torch.nn.functional.normalize(centred_keys(captured["h"][0, :1].double(), mean)[0], dim=0)
    torch.testing.assert_close(written.float(), written_key)
    other = torch.randn(
        model.config.intermediate_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    other = other - (other @ written) * written
    edit = rule.edits()[rule.targets[0].name]
    assert (other @ edit.T).norm() < 1e-5 * edit.norm() * other.norm()  # float32 weights: the edit to its rounding
    rule.disable()
