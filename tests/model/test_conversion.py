"""Llama-family checkpoints as CTM models (`CTMForCausalLM.from_llama`): the converted model computes the checkpoint's
function (logits, greedy generate, cached decoding), saves and loads like any CTM checkpoint (remote code included),
and a config the CTM decoder does not compute is refused by the field that stands in the way."""

import os

import pytest
import torch
from helpers.processes import run_without_the_package
from safetensors.torch import save_file
from tiny import assert_cached_decoding_exact
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from modeling_ctm import CTMConfig, CTMForCausalLM


# tiny decoders (d = 32, 2 layers); initializer_range 0.2 spreads the logits so greedy choices have margins above
# float rounding
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
CONFIGS = {
    # grouped-query 4:2, tied, default RoPE, no biases (SmolLM2 / TinyLlama shape)
    "gqa-tied-default": (LlamaForCausalLM, LlamaConfig(**BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    # full multi-head, untied, llama3 RoPE, attention and MLP biases (Llama 3.x RoPE)
    "mha-untied-llama3-bias": (LlamaForCausalLM, LlamaConfig(
        **BASE, num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_parameters=LLAMA3_ROPE)),
    # grouped-query, untied, default RoPE with another theta, attention bias only, a head_dim of its own, eos list
    "gqa-untied-bias-head-dim": (LlamaForCausalLM, LlamaConfig(
        **{**BASE, "eos_token_id": [2, 3]}, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e5}, rms_norm_eps=1e-5)),
    # full multi-head, tied, llama3 RoPE, no biases
    "mha-tied-llama3": (LlamaForCausalLM, LlamaConfig(
        **BASE, num_key_value_heads=4, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral-no-window": (MistralForCausalLM, MistralConfig(**BASE, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**BASE, num_key_value_heads=2, tie_word_embeddings=False)),
}  # fmt: skip


def random_llama(name: str, seed: int = 0):
    cls, config = CONFIGS[name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # biases start at zero: give them values, or a dropped bias would go unnoticed
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model


def token_ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_model_computes_the_checkpoints_function(name):
    llama = random_llama(name)
    model = CTMForCausalLM.from_llama(llama).eval()
    assert model.config.ctm_layers == "none"
    assert model.config.tie_word_embeddings == llama.config.tie_word_embeddings
    ids = token_ids()
    with torch.no_grad():
        expected = llama(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert_cached_decoding_exact(model, ids, split=9)
        prompt = ids[:, :6]
        reference = llama.generate(prompt, max_new_tokens=10, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, eos_token_id=None)  # fmt: skip
        top2 = torch.stack(reference.scores).topk(2, dim=-1).values
        # the greedy choices have margins far above float32 rounding of logits this size (~1e-6)
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-4
        generated = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert generated.tolist() == reference.sequences.tolist()


@pytest.mark.parametrize("name", ["gqa-tied-default", "mha-untied-llama3-bias", "qwen2"])
def test_exact_start_with_thinking_layers_and_carried_state(name):
    """Thinking blocks beside the MLPs start silent: the same logits, also with state carried chunk to chunk, and
    cached decoding still equals the full forward."""
    llama = random_llama(name)
    model = CTMForCausalLM.from_llama(llama, ctm_layers="last", ctm_ticks=2, ctm_carry="chunk", ctm_chunk_size=4)
    model.eval()
    assert model.config.ctm_mlp == "keep" and model.config.ctm_layer_indices == [1]
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
        assert_cached_decoding_exact(model, ids, split=9)


@pytest.mark.parametrize("name", ["mha-untied-llama3-bias", "qwen2"])
def test_save_and_from_pretrained_give_the_same_function(name, tmp_path):
    llama = random_llama(name)
    model = CTMForCausalLM.from_llama(llama).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CTMForCausalLM)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
    assert reloaded.generation_config.eos_token_id == llama.generation_config.eos_token_id


@pytest.mark.slow
def test_converted_checkpoint_loads_as_remote_code_without_the_package(tmp_path):
    """The converted folder loads with `trust_remote_code=True` where `modeling_ctm` cannot be imported (the
    conversion module travels with the model files) and computes the Llama's logits."""
    llama = random_llama("mha-untied-llama3-bias")
    CTMForCausalLM.from_llama(llama).save_pretrained(tmp_path / "ckpt")
    ids = token_ids()
    with torch.no_grad():
        expected = llama(ids).logits
    save_file({"ids": ids, "logits": expected.contiguous()}, str(tmp_path / "expected.safetensors"))
    run_without_the_package(
        f"""
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
        print("REMOTE_OK")
        """,
        tmp_path,
    )


def test_a_folder_converts_and_its_config_is_checked_before_any_weight(tmp_path):
    llama = random_llama("gqa-tied-default")
    llama.save_pretrained(tmp_path / "llama")
    model = CTMForCausalLM.from_llama(str(tmp_path / "llama")).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
    windowed = MistralForCausalLM(MistralConfig(**BASE, num_key_value_heads=2, sliding_window=16))
    windowed.save_pretrained(tmp_path / "mistral")
    os.remove(tmp_path / "mistral" / "model.safetensors")  # refused from its config alone: no weight is read
    with pytest.raises(ValueError, match="sliding_window=16"):
        CTMForCausalLM.from_llama(str(tmp_path / "mistral"))


REFUSED = {
    "yarn": (LlamaConfig(**BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                  "original_max_position_embeddings": 32}),  # fmt: skip
             "rope_parameters.rope_type='yarn'"),
    "linear": (LlamaConfig(**BASE, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
               "rope_parameters.rope_type='linear'"),
    "mistral-window": (MistralConfig(**BASE, sliding_window=4096), "sliding_window=4096"),
    "qwen2-window": (Qwen2Config(**BASE, use_sliding_window=True, sliding_window=64), "sliding_window=64"),
    "gpt2": (GPT2Config(n_embd=32, n_layer=2, n_head=4), "model_type='gpt2'"),
    "gelu": (LlamaConfig(**BASE, hidden_act="gelu"), "hidden_act='gelu'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_configs_are_refused_by_name(name):
    config, message = REFUSED[name]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        CTMConfig.from_llama_config(config)
    assert "cannot convert" in str(error.value)


def test_gemma_is_refused_by_model_type():
    from transformers import GemmaConfig

    with pytest.raises(ValueError, match="model_type='gemma'"):
        CTMConfig.from_llama_config(GemmaConfig(**BASE))


def test_a_model_without_the_causal_lm_head_is_refused():
    llama = random_llama("gqa-tied-default")
    with pytest.raises(ValueError, match="LlamaModel"):
        CTMForCausalLM.from_llama(llama.model)


def test_decoder_fields_cannot_be_overridden_through_ctm_fields():
    with pytest.raises(ValueError, match="ctm_\\* fields only.*hidden_size"):
        CTMConfig.from_llama_config(CONFIGS["gqa-tied-default"][1], hidden_size=64)
