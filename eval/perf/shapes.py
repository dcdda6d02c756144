"""Same-shape decoders: the Llama baseline and the CTMs measured against it share every decoder field."""

from __future__ import annotations

import torch
from flops import ctm_flops, llama_flops  # eval/flops.py, next to the script that runs


def llama_intermediate_size(hidden: int) -> int:
    """Llama's 8/3 * D rounded up to a multiple of 16 (768 -> 2048)."""
    return 16 * -(-8 * hidden // 48)


def same_shape_fields(
    hidden: int, layers: int, heads: int, vocab: int, kv_heads: int | None = None, max_positions: int = 2048
) -> dict:
    """Decoder fields (vocab, width, depth, heads, kv heads, intermediate size, tied embeddings) that a
    `LlamaConfig` and a `CTMConfig` both take, so the two models differ only in the CTM layers. Not
    `modeling_ctm.training.runs.language_model_config`, which reads a training preset and a tokenizer."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": llama_intermediate_size(hidden),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    }


def shape_fields(shape: dict, vocab: int) -> dict:
    """`same_shape_fields` of a preset shape ({"hidden", "layers", "heads", optional "kv_heads"})."""
    return same_shape_fields(shape["hidden"], shape["layers"], shape["heads"], vocab, shape.get("kv_heads"))


def model_specs(preset: dict, shape: dict, ctm_overrides: dict) -> list[dict]:
    """The Llama, then one CTM per (placement, ticks) of the preset."""
    specs = [{"name": "llama", "kind": "llama", "ctm_layers": "-", "ticks": 0}]
    for placement in preset["placements"]:
        for ticks in preset["ticks"]:
            specs.append({"name": f"ctm-{placement}-K{ticks}", "kind": "ctm", "ctm_layers": placement, "ticks": ticks})
    for spec in specs:
        spec["overrides"] = ctm_overrides if spec["kind"] == "ctm" else {}
    return specs


def build_model(spec: dict, shape: dict, vocab: int, device: str, compile_ticks: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_ctm import CTMConfig, CTMForCausalLM

    torch.manual_seed(0)
    fields = shape_fields(shape, vocab)
    if spec["kind"] == "llama":
        config = LlamaConfig(**fields)
        model = LlamaForCausalLM(config)
    else:
        config = CTMConfig(**fields, ctm_layers=spec["ctm_layers"], ctm_ticks=spec["ticks"], **spec["overrides"])
        model = CTMForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    model = model.to(device)
    if compile_ticks and spec["kind"] == "ctm":
        model.compile_ticks()  # torch.compile of every CTM block's tick (the schedule around it stays eager)
    return model, config


def analytic_flops(spec: dict, config, seq: int) -> dict:
    return llama_flops(config, seq) if spec["kind"] == "llama" else ctm_flops(config, seq)
