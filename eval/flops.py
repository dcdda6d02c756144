"""Analytic forward/training FLOPs per token of `LlamaForCausalLM` and `CTMForCausalLM`.

Conventions (the numbers are only comparable if these are the same for both models):

* One multiply-add is 2 FLOPs: a matmul (n x k) @ (k x m) costs 2*n*k*m.
* Per token of a training sequence of length T processed in one parallel forward (no cache).
* Embedding lookups, norms, RoPE, softmax, activations, residual adds and biases are not counted (they are O(D) per
  token and the same order for both models). The one exception is the CTM synchronisation, which the brief asks to
  count: per pair per tick 1 product + 2 (alpha <- r*alpha + p) + 2 (beta <- r*beta + 1), and 2 per pair per read
  (rsqrt, multiply).
* Causal attention: query t sees t keys, so the *average* query sees (T + 1) / 2 keys (~T/2; exactly 1 at T = 1).
  Scores cost 2*hd per key and head, the weighted sum of values the same: 4 * heads * head_dim * (T + 1) / 2.
  This is the useful work; a kernel that computes the full T x T block and masks it does ~2x more (the CTM chunk
  carry builds an explicit mask, so SDPA cannot skip blocks there).
* Training FLOPs = 3 x forward (backward = 2 x forward: gradients w.r.t. activations and weights). This ignores
  activation recomputation (`ctm_tick_checkpointing`, gradient checkpointing) and the optimizer step.

The CTM count follows `modeling_ctm.modeling_ctm.CTMBlock`: per call the block's k/v projections (D -> D each, once; with `ctm_input_injection` also the input projection);
per tick q_proj (S_action -> D), causal cross-attention over the block input (`ctm_attention_heads` heads, head dim
D/heads), the U-Net synapse (widths read from an instantiated `CTMSynapse` on the meta device, so they follow the
code), the neuron-level models (per neuron M -> 2H, GLU, H -> 2, GLU), and both synchronisation updates plus the
S_action read; readouts (S_out read + out_proj S_out -> D) run on every tick when the block is the last layer (its
ticks feed the multi-tick loss), else once on the final tick. With `ctm_mlp="keep"` the thinking layer also runs its
MLP once per token (the ticks do not re-run it). When the last layer thinks, the final norm and lm_head
run on all K ticks (K x the logits).
"""

from __future__ import annotations

import torch


def _attn_keys(seq_len: int) -> float:
    """Average number of keys a causal query attends to."""
    return (seq_len + 1) / 2


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim else config.hidden_size // config.num_attention_heads


def decoder_layer_attention_flops(config, seq_len: int) -> dict[str, float]:
    """Self-attention of one Llama-style layer, per token."""
    D = config.hidden_size
    hd = _head_dim(config)
    n_q = config.num_attention_heads * hd
    n_kv = (config.num_key_value_heads or config.num_attention_heads) * hd
    return {
        "self_attn_proj": 2 * D * n_q + 2 * 2 * D * n_kv + 2 * n_q * D,  # q, k, v, o
        "self_attn_sdpa": 4 * n_q * _attn_keys(seq_len),  # QK^T + AV over the average causal key count
    }


def mlp_flops(config) -> float:
    """SwiGLU MLP: gate, up (D -> I) and down (I -> D)."""
    return 3 * 2 * config.hidden_size * config.intermediate_size


def synapse_linear_shapes(hidden_size: int, depth: int) -> list[tuple[int, int]]:
    """(in, out) of every Linear of the U-Net synapse, from the model code itself (built on the meta device)."""
    from modeling_ctm.modeling_ctm import CTMSynapse

    with torch.device("meta"):
        synapse = CTMSynapse(hidden_size, depth)
    return [(m.in_features, m.out_features) for m in [*synapse.down, *synapse.up]]


def ctm_block_flops(config, seq_len: int, readout_every_tick: bool) -> dict[str, float]:
    """One CTM block (the MLP replacement), per token, all K ticks."""
    D = config.hidden_size
    K = config.ctm_ticks
    M, H = config.ctm_memory_length, config.ctm_nlm_hidden_size
    s_out, s_act = config.ctm_n_synch_out, config.ctm_n_synch_action
    # ctm_query_source="state": q_proj reads z (D) instead of S_action, and no S_action read feeds it
    from_state = getattr(config, "ctm_query_source", "sync_action") == "state"
    per_tick = {
        "ctm_tick_q_proj": 2 * (D if from_state else s_act) * D,
        "ctm_tick_attention": 4 * D * _attn_keys(seq_len),  # all ctm heads together span D
        "ctm_synapse": sum(2 * i * o for i, o in synapse_linear_shapes(D, config.ctm_synapse_depth)),
        "ctm_nlm": 2 * D * M * (2 * H) + 2 * D * H * 2,
        # both updates (5 per pair) + the S_action read feeding q_proj (2 per pair)
        "ctm_sync": 5 * (s_out + s_act) + (0 if from_state else 2 * s_act),
    }
    readouts = K if readout_every_tick else 1
    out = {key: K * value for key, value in per_tick.items()}
    out["ctm_kv_proj"] = 2 * 2 * D * D
    if getattr(config, "ctm_input_injection", "none") == "every_tick":  # projected once per token, added every tick
        out["ctm_input_proj"] = 2 * D * D
    out["ctm_sync"] += readouts * 2 * s_out  # S_out reads
    out["ctm_out_proj"] = readouts * 2 * s_out * D
    return out


TICK_KEYS = ("ctm_tick_q_proj", "ctm_tick_attention", "ctm_synapse", "ctm_nlm", "ctm_sync")


def _finish(breakdown: dict[str, float], seq_len: int) -> dict:
    forward = float(sum(breakdown.values()))
    return {
        "seq_len": seq_len,
        "breakdown": {k: float(v) for k, v in breakdown.items()},
        "forward": forward,
        "training": 3.0 * forward,
        "convention": "FLOPs per token; multiply-add = 2 FLOPs; causal attention averages (T+1)/2 keys per query; "
        "training = 3 x forward; embeddings, norms, activations and softmax not counted (CTM sync is)",
    }


def llama_flops(config, seq_len: int) -> dict:
    """Forward FLOPs per token of `LlamaForCausalLM(config)` on sequences of length `seq_len`."""
    breakdown = {"self_attn_proj": 0.0, "self_attn_sdpa": 0.0, "mlp": 0.0}
    for _ in range(config.num_hidden_layers):
        for key, value in decoder_layer_attention_flops(config, seq_len).items():
            breakdown[key] += value
        breakdown["mlp"] += mlp_flops(config)
    breakdown["lm_head"] = 2 * config.hidden_size * config.vocab_size
    return _finish(breakdown, seq_len)


def ctm_flops(config, seq_len: int) -> dict:
    """Forward FLOPs per token of `CTMForCausalLM(config)` on sequences of length `seq_len` (return_tick_states on,
    the default)."""
    thinking = set(config.ctm_layer_indices)
    last = config.num_hidden_layers - 1
    breakdown = {"self_attn_proj": 0.0, "self_attn_sdpa": 0.0, "mlp": 0.0}
    for idx in range(config.num_hidden_layers):
        for key, value in decoder_layer_attention_flops(config, seq_len).items():
            breakdown[key] += value
        if idx in thinking:
            for key, value in ctm_block_flops(config, seq_len, readout_every_tick=idx == last).items():
                breakdown[key] = breakdown.get(key, 0.0) + value
        if idx not in thinking or getattr(config, "ctm_mlp", "replace") == "keep":  # a kept MLP runs once per token
            breakdown["mlp"] += mlp_flops(config)
    lm_heads = config.ctm_ticks if last in thinking else 1
    breakdown["lm_head"] = lm_heads * 2 * config.hidden_size * config.vocab_size
    return _finish(breakdown, seq_len)


def model_flops(config, seq_len: int) -> dict:
    """Dispatch on the config type (anything with `ctm_ticks` is a CTM)."""
    return ctm_flops(config, seq_len) if hasattr(config, "ctm_ticks") else llama_flops(config, seq_len)


def format_breakdown(result: dict) -> str:
    total = result["forward"]
    rows = sorted(result["breakdown"].items(), key=lambda kv: -kv[1])
    return "\n".join(f"  {k:<20} {v / 1e6:10.3f} MFLOP/token fwd  {100 * v / total:5.1f}%" for k, v in rows)


if __name__ == "__main__":
    import argparse

    from transformers import LlamaConfig

    from modeling_ctm import CTMConfig

    parser = argparse.ArgumentParser(description="Print analytic FLOPs/token of a CTM and its same-shape Llama.")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--ctm-layers", default="last")
    args = parser.parse_args()
    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        tie_word_embeddings=True,
    )
    llama = llama_flops(LlamaConfig(**common), args.seq)
    ctm = ctm_flops(CTMConfig(**common, ctm_layers=args.ctm_layers, ctm_ticks=args.ticks), args.seq)
    print(f"Llama: {llama['forward'] / 1e6:.2f} MFLOP/token forward, {llama['training'] / 1e6:.2f} training")
    print(format_breakdown(llama))
    print(f"CTM:   {ctm['forward'] / 1e6:.2f} MFLOP/token forward, {ctm['training'] / 1e6:.2f} training")
    print(format_breakdown(ctm))
