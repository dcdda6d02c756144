"""Same-shape decoders: the Llama baseline and the CTMs measured against it share every decoder field."""

from __future__ import annotations

import torch
from flops import ctm_flops, llama_flops  # eval/flops.py, next to the script that runs


# what every device measures: the same vocabulary, tick counts and placements, so the rows compare across devices
GRID = {"vocab": 4096, "ticks": [1, 3], "placements": ["all", "last"]}
# `--preset cpu|gpu` of benchmark_performance.py: the shapes, step counts and decode contexts one device measures
# (not a training preset)
DEVICE_PLANS = {
    "cpu": {
        **GRID,
        "device": "cpu",
        "dtype": "float32",
        "threads": 2,
        "shapes": [
            {"name": "tiny-d64", "hidden": 64, "layers": 2, "heads": 4, "seq": 128, "batch": 8},
            {"name": "small-d128", "hidden": 128, "layers": 4, "heads": 4, "seq": 256, "batch": 4},
            {"name": "small-d256", "hidden": 256, "layers": 4, "heads": 4, "seq": 256, "batch": 4},
        ],
        "warmup": 2,
        "steps": 5,
        "decode_contexts": [32, 128, 512],
        "decode_steps": 8,
        "max_wait_s": 240,
        # phase 3 (ContinuityTrainer's chunk loop vs unchunked) on the first two shapes, C=16 (T/16 sequential
        # thinking steps per sequence either way), 4 training chunks: a few minutes on a quiet 2-core machine
        "phase3": {
            "shapes": ["tiny-d64", "small-d128"],
            "ctm_layers": "last",
            "ticks": 3,
            "chunk_size": 16,
            "chunks": 4,
            "gradient_window": 1,
            "steps": 3,
        },
    },
    "gpu": {
        **GRID,
        "device": "cuda",
        "dtype": "bfloat16",
        "threads": None,
        "shapes": [
            {"name": "d768-L12", "hidden": 768, "layers": 12, "heads": 12, "seq": 1024, "batch": 8},
            {"name": "d1024-L12", "hidden": 1024, "layers": 12, "heads": 16, "seq": 1024, "batch": 8},
        ],
        "warmup": 3,
        "steps": 10,
        "decode_contexts": [32, 128, 512, 1024],
        "decode_steps": 20,
        "max_wait_s": 60,
        "phase3": {
            "shapes": ["d768-L12"],
            "ctm_layers": "last",
            "ticks": 3,
            "chunk_size": 32,
            "chunks": 4,
            "gradient_window": 1,
            "steps": 5,
        },
    },
}


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
