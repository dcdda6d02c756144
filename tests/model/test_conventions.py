"""transformers conventions a user relies on without reading our code: the old `past_key_values` spelling, pairs that
do not depend on how the model was initialised, and a peft LoRA default that does not guess."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_config, tiny_model

from modeling_ctm import CTM_LORA_TARGET_MODULES, CTMForCausalLM


@pytest.mark.parametrize("carry", ["token", "chunk"])
def test_past_key_values_is_the_deprecated_name_of_cache(carry):
    overrides = {"ctm_carry": "chunk", "ctm_chunk_size": 4} if carry == "chunk" else {}
    model = tiny_model(**overrides)
    ids = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        prefix = model(ids[:, :5], use_cache=True)
        new = model(ids[:, 5:], cache=prefix.cache, use_cache=True).logits
        prefix = model(ids[:, :5], use_cache=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = model(ids[:, 5:], past_key_values=prefix.cache, use_cache=True).logits
        no_cache = model(ids[:, 5:], use_cache=False).logits
    assert torch.equal(old, new)
    assert not torch.allclose(no_cache, new)  # the cache matters, so the old name was not silently dropped
    assert any("past_key_values" in str(w.message) and "cache" in str(w.message) for w in caught)


def test_neuron_pairs_do_not_depend_on_how_the_model_was_initialised():
    torch.manual_seed(0)
    eager = CTMForCausalLM(tiny_config())
    with torch.device("meta"):
        lazy = CTMForCausalLM(tiny_config())
    lazy = lazy.to_empty(device="cpu")
    torch.manual_seed(1234)  # a different global RNG state must not change the structure
    lazy.init_weights()
    pairs = [name for name in eager.state_dict() if name.endswith((".left", ".right"))]
    assert len(pairs) == 8
    for name in pairs:
        assert torch.equal(eager.state_dict()[name], lazy.state_dict()[name]), name
    sync = eager.model.layers[0].thinking
    assert not torch.equal(sync.sync_out.left[:8], sync.sync_action.left[:8])  # the two roles draw different pairs
    left, right = sync.sync_out.left, sync.sync_out.right
    assert bool((left <= right).all()) and len(set(zip(left.tolist(), right.tolist()))) == left.numel()


def test_peft_lora_default_targets_self_attention_only():
    model = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n})
    assert adapted == [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert peft_model.peft_config["default"].target_modules == CTM_LORA_TARGET_MODULES
    ids = torch.randint(1, 97, (1, 6))
    assert peft_model(input_ids=ids, labels=ids).loss.isfinite()


def test_phase_conversion_is_quiet_but_still_strict(tmp_path, capsys, caplog):
    from safetensors.torch import load_file, save_file

    from modeling_ctm.training.phases import start_thinking

    tiny_model(ctm_layers="none").save_pretrained(tmp_path / "phase-1")
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        model = start_thinking(tmp_path / "phase-1", ctm_layers="last")
    assert model.config.ctm_layer_indices == [1]
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err + caplog.text

    weights = load_file(tmp_path / "phase-1" / "model.safetensors")
    del weights["model.norm.weight"]  # a weight the converted model needs and would silently re-initialise
    save_file(weights, tmp_path / "phase-1" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        start_thinking(tmp_path / "phase-1", ctm_layers="last")
