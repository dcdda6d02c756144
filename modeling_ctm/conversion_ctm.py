# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Llama-family checkpoints as CTM models: the config fields and the weights a pretrained decoder brings.

The CTM decoder is Llama's, with Llama's parameter names, so a Llama-family checkpoint converts by copying its config
fields and its state dict. With `ctm_layers="none"` the converted model computes the same function; with thinking
layers, their blocks start silent beside the MLPs (`ctm_mlp="keep"`), so the start is exact as well.

What converts is what transformers' Llama computes: grouped-query attention, tied or untied embeddings, attention and
MLP biases, `head_dim`, `rope_theta`, `rms_norm_eps` and the `default` and `llama3` RoPE. Mistral converts when it has
no sliding window; Qwen2 when it has none either (its q/k/v biases become `attention_bias=True` with a zero bias on
`o_proj`, which Qwen2 does not have). Anything else is refused with the field and value that stand in the way.

This file travels with checkpoints as remote code, like its siblings: it imports `transformers` and `torch` only.
"""

import torch


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# the decoder fields a Llama-family config shares with CTMConfig, copied as they are
DECODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)


def refuse(field: str, value, allowed: str) -> None:
    raise ValueError(f"cannot convert a checkpoint with {field}={value!r} to a CTM model: {allowed}.")


def decoder_fields_from_llama(llama_config) -> dict:
    """The `CTMConfig` decoder fields of a Llama-family config, after refusing what the CTM decoder does not compute."""
    model_type = getattr(llama_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        refuse("model_type", model_type, f"supported model types are {SUPPORTED_MODEL_TYPES}")
    rope = dict(getattr(llama_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        refuse("rope_parameters.rope_type", rope_type, f"supported RoPE types are {SUPPORTED_ROPE_TYPES}")
    # Mistral keeps sliding_window set; Qwen2 keeps a value there but applies it only with use_sliding_window
    window = getattr(llama_config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(llama_config, "use_sliding_window", False):
        window = None
    if window is not None:
        refuse("sliding_window", window, "only full causal attention converts (sliding_window=None)")
    if getattr(llama_config, "pretraining_tp", 1) not in (None, 1):
        refuse("pretraining_tp", llama_config.pretraining_tp, "only pretraining_tp=1 converts")
    if getattr(llama_config, "hidden_act", "silu") != "silu":
        refuse("hidden_act", llama_config.hidden_act, "only the SiLU-gated MLP converts (hidden_act='silu')")
    fields = {name: getattr(llama_config, name) for name in DECODER_FIELDS if hasattr(llama_config, name)}
    fields["rope_parameters"] = rope
    if model_type == "qwen2":
        fields["attention_bias"], fields["mlp_bias"] = True, False
    else:
        fields["attention_bias"] = bool(getattr(llama_config, "attention_bias", False))
        fields["mlp_bias"] = bool(getattr(llama_config, "mlp_bias", False))
    if fields.get("head_dim") is None:
        fields["head_dim"] = llama_config.hidden_size // llama_config.num_attention_heads
    return fields


def load_llama(model_or_path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """A Llama-family causal LM from an instance, a local folder or a Hub id (with `gguf_file`, a GGUF file in that
    folder, dequantized by transformers). The config is checked before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    if isinstance(model_or_path, PreTrainedModel):
        decoder_fields_from_llama(model_or_path.config)
        return model_or_path
    config = AutoConfig.from_pretrained(model_or_path, gguf_file=gguf_file)
    decoder_fields_from_llama(config)
    return AutoModelForCausalLM.from_pretrained(model_or_path, gguf_file=gguf_file, dtype=dtype)


def ctm_state_dict_from_llama(state_dict: dict, llama_config) -> dict:
    """Llama's state dict under the CTM model's names: the names are the same; Qwen2's `o_proj` gains a zero bias (the
    CTM attention has one bias switch for all four projections)."""
    converted = dict(state_dict)
    if getattr(llama_config, "model_type", None) == "qwen2":
        for i in range(llama_config.num_hidden_layers):
            weight = converted[f"model.layers.{i}.self_attn.o_proj.weight"]
            converted[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return converted


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "ctm_state_dict_from_llama",
    "decoder_fields_from_llama",
    "load_llama",
]
