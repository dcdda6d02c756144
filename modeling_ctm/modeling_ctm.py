# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""A neuroplastic Continuous Thought Machine (CTM) language model in the house style of `transformers`.

Reading order: Llama-style building blocks -> the CTM pieces (synapse, neuron-level models over the trace,
synchronisation, the block and its tick) -> decoder layer -> PreTrainedModel -> models and heads. Beside it, as in a
transformers model folder: `cache_ctm.py` (the thinking state, the cache, the carry schedule and its padding masks),
`observers_ctm.py` (the tick observer), `kernels_ctm.py` (the fused neuron-level models), `loss_ctm.py` (the multi-tick
loss), `checks_ctm.py` (the input checks: what is refused, and when values are read) and `io_ctm.py` (atomic files, the
folder-atomic `save_pretrained`, load errors that name the file).

One CTM block, per token, runs K ticks of::

    query  = q_proj(S_action)                       # the neurons' co-firing asks a question ...
    obs    = causal_cross_attention(query, K, V)    # ... of the block's own inputs at positions <= t
    pre    = z + synapse([obs ; z + tick_embed[k]]) # U-Net synapse mixes observation and state
    trace  = roll(trace, pre)                       # last M pre-activations per neuron
    z      = neuron_level_models(trace)             # every neuron has its own small GLU MLP
    S_out, S_action = decayed pairwise products of z (fp32 accumulators)
    y_k    = out_proj(S_out)                        # zero-initialised readout into the residual stream

The thinking state (z, trace, both accumulators) can be carried between positions: `ctm_carry="chunk"` starts every
token of chunk c from the final state of the last token of chunk c-1. `forward`, chunked training and cached `generate`
run the same schedule, so they compute the same function.

This file and its siblings travel with checkpoints as remote code: they import `transformers`, `torch`, `safetensors`,
`numpy` and each other only (single-dot imports, which transformers copies next to the checkpoint).
"""

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_ctm import (
    CTMCache,
    CTMCacheLayer,
    ThinkingSchedule,
    ThinkingState,
    new_token_mask,
    plan_thinking,
    read_synchronisation,
    sync_convergence,
    thinking_masks,
)
from .checks_ctm import (
    SUPPORTED_DECODING,
    validate_call,
    validate_decoding_mode,
    validate_inputs,
    validate_labels,
)
from .confidence_ctm import CTMConfidenceHead, CTMConfidenceRecorder
from .configuration_ctm import MAX_DECAY, CTMConfig
from .conversion_ctm import ctm_state_dict_from_llama, load_llama
from .io_ctm import save_folder_atomically, unreadable_weights
from .kernels_ctm import FusedNeuronLevelModels, _autocast_dtype, nlm_forward_torch
from .loss_ctm import multi_tick_loss, next_token_labels, tick_certainty
from .observers_ctm import (
    CTMGenerationCertainty,
    CTMLayerEvent,
    CTMLayerProbe,
    CTMObserverHandle,
    CTMOutputEvent,
    CTMProbeRecorder,
    CTMTickEvent,
    CTMTickObserver,
)


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Llama-style building blocks.
# ----------------------------------------------------------------------------------------------------------------------


class CTMRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class CTMRotaryEmbedding(nn.Module):
    def __init__(self, config: CTMConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: CTMConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class CTMAttention(nn.Module):
    """Grouped-query self-attention with RoPE, through the `transformers` attention interface."""

    def __init__(self, config: CTMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class CTMMLP(nn.Module):
    """The gated MLP of a layer that does not think (phase 1, or layers left out of `ctm_layers`)."""

    def __init__(self, config: CTMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CTMTokenShift(nn.Module):
    """`ctm_token_shift="embedding"`: x_t + W x_{t-1}, with x_{t-1} the input embedding of the previous real token.

    Handing each position its previous token lets one attention layer match "the token after the one I am looking
    at" (an induction head) without first having to form a previous-token head, which a small model on CPU does not
    in its budget. Padding is skipped: a real token's previous token is the last *real* one before it,
    and a sequence's first real token gets zero. W starts at zero, so a fresh shift adds nothing."""

    def __init__(self, config: CTMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.hidden_size, config.hidden_size))

    def forward(
        self, embeds: torch.Tensor, token_mask: torch.Tensor | None, carried: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`embeds` (B, T, D) of the new tokens, `token_mask` (B, T) bool marking the real ones (None: all real),
        `carried` (B, D) the last real embedding of earlier calls (None: there were none). Returns the shifted
        embeddings and the last real embedding so far, which the next call carries."""
        B, T, D = embeds.shape
        start = carried.to(embeds.dtype) if carried is not None else embeds.new_zeros(B, D)
        history = torch.cat([start[:, None], embeds], dim=1)  # column 0 is what came before this call
        if token_mask is None:
            previous, last = history[:, :-1], embeds[:, -1]
        else:
            columns = torch.arange(1, T + 1, device=embeds.device)
            # the history column of the last real token at or before each position
            last_real = torch.where(token_mask, columns, 0).cummax(dim=1).values
            previous_column = torch.cat([last_real.new_zeros(B, 1), last_real[:, :-1]], dim=1)
            previous = history.gather(1, previous_column[..., None].expand(B, T, D))
            last = history[torch.arange(B, device=embeds.device), last_real[:, -1]]
        return embeds + F.linear(previous, self.weight.to(embeds.dtype)), last


class CTMTokenMemory(nn.Module):
    """`ctm_token_memory="token"`: a fast-weight associative memory with one slot (a D-vector) per vocabulary token,
    added to the final-normed hidden state wherever that token is the input, so it moves what follows the token.

    The slots start at zero (a fresh memory adds nothing) and training leaves them there unless told otherwise; phase
    4's delta rule writes them (`PlasticityConfig(targets=["token_memory"])`). One-hot keys are exactly orthogonal:
    a write under one token never changes the output at another, and the key is the same in every context, so a
    fact told in one conversation is read back in the next (the model's own representations of different
    names were nearly parallel, and the same name's varied with its context)."""

    def __init__(self, config: CTMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))

    def forward(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The CTM pieces: synapse, neuron-level models over the trace, synchronisation.
# ----------------------------------------------------------------------------------------------------------------------


class CTMSynapse(nn.Module):
    """The U-Net synapse (reference nanoctm): bias-free Linear+SiLU down to a width-16 bottleneck, then
    Linear+SiLU+LayerNorm up with concatenated skips. Input [observation ; state] (2D), output D."""

    min_width = 16

    def __init__(self, hidden_size: int, depth: int):
        super().__init__()
        half = depth // 2
        d_in = 2 * hidden_size
        widths = [max(self.min_width, round(d_in + (self.min_width - d_in) * i / half)) for i in range(half + 1)]
        self.down = nn.ModuleList(nn.Linear(widths[i], widths[i + 1], bias=False) for i in range(half))
        up_in = [widths[half]] + [2 * widths[half - j] for j in range(1, half)]
        up_out = [widths[half - 1 - j] for j in range(half - 1)] + [hidden_size]
        self.up = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in zip(up_in, up_out))
        self.up_norms = nn.ModuleList(nn.LayerNorm(o) for o in up_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2-D inside: a Linear on a 3-D input adds two reshapes around its matmul, ~60 per tick at the default depth,
        # which was a fifth of a decode step's ops (the matmuls are the same, so are the values). The last layer gets
        # its input in the caller's shape again: plasticity hooks it and reads its input and output per token.
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        skips = []
        for layer in self.down:
            x = F.silu(layer(x))
            skips.append(x)
        # skips[-1] is the bottleneck; the up path re-uses the down activations in reverse, the input itself never
        u = skips[-1]
        for j, (layer, norm) in enumerate(zip(self.up, self.up_norms)):
            if j > 0:
                u = torch.cat([u, skips[-1 - j]], dim=-1)
            if j == len(self.up) - 1:
                u = u.view(*lead, u.shape[-1])
            u = norm(F.silu(layer(u)))
        return u


class CTMNeuronLevelModels(nn.Module):
    """Every neuron d has its own two-layer GLU MLP over its trace of M pre-activations: M -> 2H -> GLU -> 2 -> GLU.

    Weights are stored neuron-major, (D, M, 2H) and (D, H, 2), so each layer is one batched matmul over neurons with
    the bias folded in (`baddbmm`): the per-neuron models are memory-bound, and this layout avoids a permuted copy of
    the hidden activations and a separate bias pass. `implementation="fused"` runs them as `FusedNeuronLevelModels`
    (`CTMConfig.ctm_nlm_implementation`).
    """

    def __init__(self, hidden_size: int, memory_length: int, nlm_hidden_size: int, implementation: str = "plain"):
        super().__init__()
        D, M, H = hidden_size, memory_length, nlm_hidden_size
        self.implementation = implementation
        self.w1 = nn.Parameter(torch.empty(D, M, 2 * H))
        self.b1 = nn.Parameter(torch.empty(D, 1, 2 * H))
        self.w2 = nn.Parameter(torch.empty(D, H, 2))
        self.b2 = nn.Parameter(torch.empty(D, 1, 2))

    def forward(self, trace: torch.Tensor) -> torch.Tensor:
        """trace (..., D, M) -> post-activation (..., D)."""
        *lead, D, M = trace.shape
        neuron_major = trace.reshape(-1, D, M).transpose(0, 1)  # (D, N, M)
        if self.implementation == "fused":
            # the autograd function runs with autocast off, so the casts autocast would do happen here, once
            dtype = _autocast_dtype(trace)
            with torch.autocast(trace.device.type, enabled=False):
                weights = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
                post = FusedNeuronLevelModels.apply(neuron_major.to(dtype), *weights)
        else:
            dtype = trace.dtype
            post = nlm_forward_torch(neuron_major, *(p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2)))
        return post.transpose(0, 1).reshape(*lead, D)


class _ClampWithRecovery(torch.autograd.Function):
    """Clamp to [0, high] in the forward pass; in the backward pass let through every gradient that would move an
    out-of-range value back into range. A plain clamp has zero gradient outside the range, so a decay pushed below 0 by
    one optimiser step would be frozen forever (the reference's dead zone).

    The bound comes as a tensor, and the clamp is `maximum`/`minimum` (the same values): under
    `torch.compile(dynamic=True)` a Python float becomes symbolic, and dynamo fails lifting one into the function."""

    @staticmethod
    def forward(ctx, x, high):
        ctx.save_for_backward(x, high)
        return torch.minimum(torch.maximum(x, torch.zeros_like(x)), high)

    @staticmethod
    def backward(ctx, grad):
        x, high = ctx.saved_tensors
        # gradient descent moves x by -grad: below the range it must be allowed to grow (grad < 0), above to shrink
        keep = ((x >= 0) & (x <= high)) | ((x < 0) & (grad < 0)) | ((x > high) & (grad > 0))
        return grad * keep, None


class CTMSynchronisation(nn.Module):
    """Decayed co-firing of S fixed neuron pairs: alpha <- r*alpha + w*z_i*z_j, beta <- r*beta + w, read as
    alpha/sqrt(beta). Accumulated in float32 whatever the compute dtype. `w` is the per-token surprise weight."""

    def __init__(self, hidden_size: int, n_pairs: int, pair_seed: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        # the pairs are structure, not weights: drawn from their own seed so that __init__ and `init_weights` (e.g.
        # after building on the meta device) give the same pairs whatever the global RNG did in between
        self.pair_seed = pair_seed
        left, right = self.sample_pairs(hidden_size, n_pairs, pair_seed)
        self.left = nn.Buffer(left)
        self.right = nn.Buffer(right)
        self.decay = nn.Parameter(torch.zeros(n_pairs))

    @staticmethod
    def sample_pairs(hidden_size: int, n_pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`n_pairs` distinct unordered neuron pairs (i <= j), self-pairs included, drawn without replacement by a
        CPU generator seeded with `seed` (the same pairs on every device and run)."""
        total = hidden_size * (hidden_size + 1) // 2
        if not 0 < n_pairs <= total:
            raise ValueError(
                f"n_pairs={n_pairs} is invalid: allowed values are 1..{total} for hidden_size={hidden_size}"
            )
        flat = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_pairs]
        row_lengths = torch.arange(hidden_size, 0, -1)
        row_starts = torch.cumsum(row_lengths, 0) - row_lengths
        left = torch.searchsorted(row_starts, flat, right=True) - 1
        right = left + (flat - row_starts[left])
        return left, right

    def decay_rates(self) -> torch.Tensor:
        decay = self.decay.float()
        return torch.exp(-_ClampWithRecovery.apply(decay, torch.full_like(decay, MAX_DECAY)))

    def pair_products(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., self.left].float() * state[..., self.right].float()

    def seed(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.pair_products(state)
        return alpha, torch.ones_like(alpha)

    def update(self, alpha, beta, state, rate, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
        products = self.pair_products(state)
        if weight is None:
            return rate * alpha + products, rate * beta + 1.0
        return rate * alpha + weight * products, rate * beta + weight

    read = staticmethod(read_synchronisation)


# ----------------------------------------------------------------------------------------------------------------------
# The CTM block and its tick.
# ----------------------------------------------------------------------------------------------------------------------


class CTMBlock(nn.Module):
    """The thinking block that replaces a layer's MLP (reference nanoctm CTMBlock, with fp32 sync, no decay dead zone,
    a cached cross-attention and a well-defined carried state)."""

    def __init__(self, config: CTMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.carry = config.ctm_carry
        self.ticks = config.ctm_ticks
        self.checkpoint_ticks = config.ctm_tick_checkpointing
        self.halt_threshold = config.ctm_halt_threshold
        D, M = config.hidden_size, config.ctm_memory_length
        self.num_heads = config.ctm_attention_heads
        self.head_dim = D // self.num_heads
        # observation: the neurons' action synchronisation (or, `ctm_query_source="state"`, their last post-activations)
        # queries the block's own (normed) inputs
        self.query_from_state = config.ctm_query_source in ("state", "input_then_state")
        self.query_input_first = config.ctm_query_source == "input_then_state"
        self.q_proj = nn.Linear(D if self.query_from_state else config.ctm_n_synch_action, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        # `ctm_query_scale="learned"`: a per-head log-gain on the normed query (normed q and k cap a logit at
        # sqrt(head_dim), too soft for a lookup at small head_dim)
        self.query_log_scale = nn.Parameter(torch.empty(self.num_heads)) if config.ctm_query_scale == "learned" else None
        self.synapse = CTMSynapse(D, config.ctm_synapse_depth)
        self.state_norm = config.ctm_state_norm == "rms"  # a tick's gain can exceed 1: bound z over long carries
        self.neurons = CTMNeuronLevelModels(D, M, config.ctm_nlm_hidden_size, config.ctm_nlm_implementation)
        # one pair seed per (layer, role): the two sets differ, and a model is reproducible from its config alone
        self.sync_out = CTMSynchronisation(D, config.ctm_n_synch_out, pair_seed=2 * layer_idx)
        self.sync_action = CTMSynchronisation(D, config.ctm_n_synch_action, pair_seed=2 * layer_idx + 1)
        self.out_proj = nn.Linear(config.ctm_n_synch_out, D, bias=False)
        self.sync_seed = config.ctm_sync_seed
        # the reference's tick-0 query is the same for every token: re-inject the token's own input at every tick
        self.input_proj = nn.Linear(D, D, bias=False) if config.ctm_input_injection == "every_tick" else None
        # raw S_out is small and nearly token-invariant, so a zero out_proj learns slowly and the block gets no gradient:
        # optionally normalise it, and gate a random out_proj with a scalar at 0 (ReZero) so the start stays exact
        norm = config.ctm_readout_norm
        self.out_norm = CTMRMSNorm(config.ctm_n_synch_out, eps=config.rms_norm_eps) if norm != "none" else None
        self.out_gate = nn.Parameter(torch.empty(1)) if norm == "rms_gate" else None
        self.start_state = nn.Parameter(torch.empty(D))
        self.start_trace = nn.Parameter(torch.empty(D, M))
        self.tick_embed = nn.Parameter(torch.empty(config.ctm_ticks, D)) if config.ctm_tick_embeddings else None
        # {handle id: CTMTickObserver}; the model shares one registry with all its blocks (`add_tick_observer`)
        self.observers: dict[int, CTMTickObserver] = {}

    # -- pieces --------------------------------------------------------------------------------------------------------

    def observe_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (RMS-normed per head) and values of the cross-attention: (B, H, T, HD)."""
        B, T, _ = hidden_states.shape
        keys = self.k_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        keys = F.rms_norm(keys, (self.head_dim,))
        values = self.v_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def start(self, dtype: torch.dtype) -> ThinkingState:
        """The learned start state, batch dims (1,)."""
        state = self.start_state.to(dtype)[None]
        trace = self.start_trace.to(dtype)[None]
        alpha_out, beta_out = self.sync_out.seed(state)
        alpha_action, beta_action = self.sync_action.seed(state)
        if self.sync_seed == "zero":  # the start state's constant products would otherwise dominate S
            alpha_out, alpha_action = torch.zeros_like(alpha_out), torch.zeros_like(alpha_action)
        return ThinkingState(state, trace, alpha_out, beta_out, alpha_action, beta_action)

    def readout(self, thinking: ThinkingState) -> torch.Tensor:
        """y = out_proj(S_out) (`ctm_readout_norm`: of RMS-normed S_out, times a gate): what this tick would add to the
        residual stream."""
        sync = CTMSynchronisation.read(thinking.alpha_out, thinking.beta_out)
        if self.out_norm is not None:
            sync = self.out_norm(sync)  # in fp32, like the accumulators
        output = self.out_proj(sync.to(self.out_proj.weight.dtype))
        return output if self.out_gate is None else self.out_gate.to(output.dtype) * output

    def tick(
        self,
        tick: int,
        thinking: ThinkingState,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        rate_out: torch.Tensor,
        rate_action: torch.Tensor,
        surprise_weight: torch.Tensor | None = None,
        injected: torch.Tensor | None = None,
    ) -> ThinkingState:
        """One internal tick for tokens of shape (B, n): observe, synapse, trace, neuron models, synchronise.
        `injected` (B, n, D): the tokens' own projected inputs (`ctm_input_injection`), added to query and synapse."""
        z = thinking.state
        B, n, D = z.shape
        if self.query_input_first:  # tick 0 looks up the token itself, each later tick what the tick before found
            query = injected if tick == 0 else self.q_proj(z)
        elif self.query_from_state:  # what the last tick computed asks this tick's question
            query = self.q_proj(z)
        else:
            sync_action = CTMSynchronisation.read(thinking.alpha_action, thinking.beta_action)
            query = self.q_proj(sync_action.to(z.dtype))
        if injected is not None and not self.query_input_first:
            query = query + injected
        query = query.view(B, n, self.num_heads, self.head_dim)
        query = F.rms_norm(query, (self.head_dim,)).transpose(1, 2)
        if self.query_log_scale is not None:
            query = query * self.query_log_scale.exp().to(query.dtype)[:, None, None]
        observation = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=attention_mask, is_causal=is_causal
        )
        observation = observation.transpose(1, 2).reshape(B, n, D)
        state_in = z if self.tick_embed is None else z + self.tick_embed[tick].to(z.dtype)
        if injected is not None:
            state_in = state_in + injected
        pre_activation = z + self.synapse(torch.cat([observation, state_in], dim=-1))
        trace = torch.cat([thinking.trace[..., 1:], pre_activation.unsqueeze(-1)], dim=-1)
        z = self.neurons(trace)
        if self.state_norm:
            z = F.rms_norm(z, (D,))
        return self.synchronise(thinking, z, trace, rate_out, rate_action, surprise_weight)

    def synchronise(self, thinking, z, trace, rate_out, rate_action, surprise_weight=None) -> ThinkingState:
        """The new state: z and its trace, with both accumulators of `thinking` advanced by z's pair products."""
        alpha_out, beta_out = self.sync_out.update(thinking.alpha_out, thinking.beta_out, z, rate_out, surprise_weight)
        alpha_action, beta_action = self.sync_action.update(
            thinking.alpha_action, thinking.beta_action, z, rate_action, surprise_weight
        )
        return ThinkingState(z, trace, alpha_out, beta_out, alpha_action, beta_action)

    # 1 - ||S_out,k - S_out,k-1|| / ||S_out,k|| per token: the block's own certainty (see `cache_ctm.sync_convergence`)
    sync_convergence = staticmethod(sync_convergence)

    def think(self, thinking, keys, values, step, rates, surprise_weight, record_ticks, sequence_length, injected=None):
        """Run the K ticks of one step. Returns the final state, the final output y_{K-1} (B, n, D) and, when
        `record_ticks`, the stacked per-tick outputs (B, n, K, D).

        With a `halt_threshold`, a token whose sync convergence reaches it after tick k skips ticks k+1..K-1: its
        state stays exactly as tick k left it (so later outputs repeat y_k and the carried state is that state)."""
        per_tick_outputs = []
        halted = None
        for k in range(self.ticks):
            before = thinking
            args = (k, thinking, keys, values, step.attention_mask, step.is_causal, *rates, surprise_weight, injected)
            if self.checkpoint_ticks and self.training and torch.is_grad_enabled():
                thinking = checkpoint(self.tick, *args, use_reentrant=False)
            else:
                thinking = self.tick(*args)
            if halted is not None:
                thinking = ThinkingState.where(halted, before, thinking)
            if self.observers:
                event = CTMTickEvent(
                    self.layer_idx, k, before, thinking, step.columns, step.valid, sequence_length,
                    ticks=self.ticks, readout=self.readout, decay_rates=self.sync_out.decay_rates, halted=halted,
                )
                thinking = self.notify_tick(event, rates, surprise_weight)
            if record_ticks or k == self.ticks - 1:
                per_tick_outputs.append(self.readout(thinking))
            if self.halt_threshold is not None and k < self.ticks - 1:
                settled = self.sync_convergence(before, thinking) >= self.halt_threshold
                halted = settled if halted is None else halted | settled
                # nobody thinks on: skip the remaining ticks (a shortcut only, left out of a compiled graph: a
                # halted token's state stays put either way)
                if not self.observers and not torch.compiler.is_compiling() and bool(halted.all()):
                    output = per_tick_outputs[-1] if record_ticks else self.readout(thinking)
                    per_tick_outputs += [output] * (self.ticks - len(per_tick_outputs))
                    break
        ticks = torch.stack(per_tick_outputs, dim=2) if record_ticks else None
        return thinking, per_tick_outputs[-1], ticks

    def notify_tick(self, event: CTMTickEvent, rates, surprise_weight) -> ThinkingState:
        """Let observers replace the tick's state (the tick's synchronisation is recomputed from the replacement),
        then tell them the final state."""
        observers = list(self.observers.values())
        for observer in observers:
            replaced = observer.intervene(event)
            if replaced is not None:
                z = replaced.to(event.after.state.dtype)
                event.after = self.synchronise(event.before, z, event.after.trace, *rates, surprise_weight)
        for observer in observers:
            observer.on_tick(event)
        return event.after

    # -- forward -------------------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        schedule: ThinkingSchedule,
        cache_layer: CTMCacheLayer | None = None,
        surprise_weight: torch.Tensor | None = None,
        record_ticks: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, T, D), normed. Returns the final-tick output (B, T, D) and, when `record_ticks`, every
        tick's output (B, T, K, D). Padding slots get zeros and never advance the carried state."""
        B, T, D = hidden_states.shape
        dtype = hidden_states.dtype
        keys, values = self.observe_inputs(hidden_states)
        if cache_layer is not None:
            keys, values = cache_layer.update_observations(keys, values)
        rates = (self.sync_out.decay_rates(), self.sync_action.decay_rates())

        start = self.start(dtype).map(lambda t: t.expand(B, *t.shape[1:]))
        last = cache_layer.last if cache_layer is not None and cache_layer.last is not None else start
        if self.carry == "chunk":
            entry = cache_layer.entry if cache_layer is not None and cache_layer.entry is not None else start
            entry = ThinkingState.where(schedule.begins_new_chunk, last, entry)
        else:
            entry = start
        entry_of_last_chunk = entry

        concatenated, scattered = [], []
        for step in schedule.steps:
            weight = None
            if surprise_weight is not None:
                weight = surprise_weight.to(torch.float32).gather(1, step.columns).unsqueeze(-1)
            injected = None
            if self.input_proj is not None:  # once per step, not per tick
                inputs = hidden_states.gather(1, step.columns[..., None].expand(-1, -1, D))
                injected = self.input_proj(inputs)
            thinking, final_output, step_ticks = self.think(
                entry.expand_tokens(step.columns.shape[1]), keys, values, step, rates, weight, record_ticks, T, injected
            )
            if step.contiguous:
                concatenated.append((final_output * step.valid[..., None].to(dtype), step_ticks))
            else:
                scattered.append((step.columns, step.valid, final_output, step_ticks))
            final = thinking.select_tokens(step.last_slot)
            if step.every_row:
                entry_of_last_chunk, last = entry, final
            else:  # rows without a token here keep what they had
                entry_of_last_chunk = ThinkingState.where(step.has_tokens, entry, entry_of_last_chunk)
                last = ThinkingState.where(step.has_tokens, final, last)
            entry = last  # the next chunk of every row enters from this chunk's last token

        ticks = None
        if concatenated:  # steps tile the columns in order
            output = torch.cat([piece for piece, _ in concatenated], dim=1)
            if record_ticks:
                ticks = torch.cat([piece for _, piece in concatenated], dim=1)
        else:  # one scatter for all steps (padding, or rows at different positions)
            output = hidden_states.new_zeros(B, T, D)
            ticks = hidden_states.new_zeros(B, T, self.ticks, D) if record_ticks else None
            # every real token sits in exactly one step's slot: adding each step's masked outputs at their columns
            # writes it once and adds exact zeros elsewhere, with static shapes (no nonzero, so it compiles unbroken)
            for columns, valid, step_output, step_ticks in scattered:
                keep = valid[..., None].to(dtype)
                output = output.scatter_add(1, columns[..., None].expand(-1, -1, D), step_output * keep)
                if record_ticks:
                    index = columns[..., None, None].expand(-1, -1, self.ticks, D)
                    ticks = ticks.scatter_add(1, index, step_ticks * keep[..., None])
        if cache_layer is not None:
            cache_layer.last = last
            cache_layer.entry = entry_of_last_chunk
        return output, ticks


# ----------------------------------------------------------------------------------------------------------------------
# Decoder layer, PreTrainedModel, models and heads.
# ----------------------------------------------------------------------------------------------------------------------


class CTMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CTMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = CTMAttention(config=config, layer_idx=layer_idx)
        self.is_thinking = layer_idx in config.ctm_layer_indices
        if self.is_thinking:
            self.thinking = CTMBlock(config, layer_idx)
        # ctm_mlp="keep": the MLP stays beside the block, so a converted phase-1 layer starts at its old function
        self.mlp = CTMMLP(config) if not self.is_thinking or config.ctm_mlp == "keep" else None
        self.input_layernorm = CTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = CTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        thinking_schedule: ThinkingSchedule | None = None,
        surprise_weight: torch.Tensor | None = None,
        record_ticks: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the layer output and, for a thinking layer asked to `record_ticks`, the residual stream after each
        tick (B, T, K, D)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if not self.is_thinking:
            return residual + self.mlp(hidden_states), None
        if self.mlp is not None:  # the ticks add to what the kept MLP already wrote
            residual = residual + self.mlp(hidden_states)
        output, ticks = self.thinking(
            hidden_states,
            thinking_schedule,
            cache_layer=cache.layers[self.layer_idx] if cache is not None else None,
            surprise_weight=surprise_weight,
            record_ticks=record_ticks,
        )
        if self.thinking.observers:
            event = CTMLayerEvent(self.layer_idx, residual, output)
            for observer in list(self.thinking.observers.values()):
                observer.on_layer(event)
        tick_residuals = residual.unsqueeze(2) + ticks if ticks is not None else None
        return residual + output, tick_residuals


def _is_fully_sharded(module: nn.Module) -> bool:
    """Whether FSDP2's `fully_shard` manages `module` (torch builds without distributed support have no FSDP)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class CTMPreTrainedModel(PreTrainedModel):
    config: CTMConfig
    config_class = CTMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CTMDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _is_stateful = True  # the carried thinking state cannot be rolled back: no assisted decoding
    _can_record_outputs = {"hidden_states": CTMDecoderLayer, "attentions": CTMAttention}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, atomic per file: everything is written into a private staging folder
        inside `save_directory`, then each file is renamed into place with the usual permissions (`publish_file`). A
        process killed during the save leaves the previous weights file whole and loadable."""
        # `register_for_auto_class` records only the saved class in `auto_map`; list both so that AutoModel and
        # AutoModelForCausalLM both load the folder as remote code.
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_ctm.CTMModel",
                "AutoModelForCausalLM": "modeling_ctm.CTMForCausalLM",
            }
        if _is_fully_sharded(self):
            return self._save_fully_sharded(save_directory, *args, **kwargs)
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory) or kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True):
            # the error for a file, a Hub upload, or a non-main process (which writes nothing) go the usual way
            return super().save_pretrained(save_directory, *args, **kwargs)
        save = super().save_pretrained
        return save_folder_atomically(lambda staging: save(staging, *args, **kwargs), save_directory)

    def _save_fully_sharded(self, save_directory, *args, **kwargs):
        """`save_pretrained` of a model sharded by FSDP2 (`fully_shard`). Its parameters are shards, which safetensors
        cannot write, and its class is a generated `FSDP<class>` defined in torch, which `save_pretrained` would name in
        `auto_map` and whose files it would copy instead of this package's code. Without a `state_dict` the full one
        is gathered (a collective: every process calls this, as after a Trainer run) and only rank 0 writes. The
        folder is then saved as the class the model was built as."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if kwargs.get("state_dict") is None:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets the tensors, on CPU
            kwargs["state_dict"] = get_model_state_dict(self, options=options)
            kwargs["is_main_process"] = kwargs.get("is_main_process", True) and torch.distributed.get_rank() == 0
        wrapper_class = type(self)
        self.__class__ = wrapper_class.__bases__[-1]  # torch builds it as type(f"FSDP{name}", (FSDPModule, cls), ...)
        try:
            return self.save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapper_class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` whose error for a truncated or corrupted weights file names the file."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise unreadable_weights(pretrained_model_name_or_path, error) from error

    def add_tick_observer(self, observer: CTMTickObserver) -> CTMObserverHandle:
        """Register `observer` (see `CTMTickObserver`) with every thinking layer; `.remove()` the handle to stop."""
        if not isinstance(observer, CTMTickObserver):
            raise TypeError(f"observer must be a CTMTickObserver, got {type(observer).__name__}")
        registry = self.base_model.tick_observers
        handle = CTMObserverHandle(registry)
        registry[handle.id] = observer
        return handle

    @contextlib.contextmanager
    def observing(self, *observers: CTMTickObserver):
        """`with model.observing(a, b): ...` registers the observers for the duration of the block."""
        handles = [self.add_tick_observer(observer) for observer in observers]
        try:
            yield observers[0] if len(observers) == 1 else observers
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _init_weights(self, module):
        # the reference scale for every matrix inside a CTM block: U(-s, s), s = sqrt(3) * fan_in^-1/2 * 0.68 (fan-in D)
        def ctm_scale_for(fan_in: int) -> float:
            return math.sqrt(3) * fan_in**-0.5 * 0.68

        ctm_scale = ctm_scale_for(self.config.hidden_size)
        if isinstance(module, CTMBlock):
            D, M = module.start_trace.shape
            for linear in (module.q_proj, module.k_proj, module.v_proj, module.input_proj):
                if linear is not None:
                    init.uniform_(linear.weight, -ctm_scale, ctm_scale)
            if module.out_gate is None:
                init.zeros_(module.out_proj.weight)  # a fresh block adds nothing to the residual stream
            else:  # the gate at 0 keeps the fresh block silent; a random out_proj lets the gate's gradient flow
                scale = ctm_scale_for(module.out_proj.in_features)
                init.uniform_(module.out_proj.weight, -scale, scale)
                init.zeros_(module.out_gate)
            init.uniform_(module.start_state, -(D**-0.5), D**-0.5)
            init.uniform_(module.start_trace, -((D + M) ** -0.5), (D + M) ** -0.5)
            if module.tick_embed is not None:
                init.normal_(module.tick_embed, mean=0.0, std=0.02)
            if module.query_log_scale is not None:
                init.zeros_(module.query_log_scale)  # gain 1: the fixed scale's attention at step 0
        elif isinstance(module, CTMSynapse):
            for linear in [*module.down, *module.up]:
                init.uniform_(linear.weight, -ctm_scale, ctm_scale)
        elif isinstance(module, CTMNeuronLevelModels):
            _, M, H2 = module.w1.shape
            H = module.w2.shape[1]
            init.uniform_(module.w1, -((M + H2) ** -0.5), (M + H2) ** -0.5)
            init.zeros_(module.b1)
            init.uniform_(module.w2, -((H + 2) ** -0.5), (H + 2) ** -0.5)
            init.zeros_(module.b2)
        elif isinstance(module, CTMSynchronisation):
            left, right = CTMSynchronisation.sample_pairs(module.hidden_size, module.left.numel(), module.pair_seed)
            init.copy_(module.left, left)
            init.copy_(module.right, right)
            low, high = self.config.ctm_decay_init_range
            init.uniform_(module.decay, low, high) if high > low else init.constant_(module.decay, low)
        elif isinstance(module, CTMTokenShift):
            init.zeros_(module.weight)  # adds nothing at step 0; its gradient, sum_t g_t x_{t-1}^T, is not zero
        elif isinstance(module, CTMTokenMemory):
            init.zeros_(module.weight)  # an empty memory adds nothing
        elif isinstance(module, CTMConfidenceHead):
            init.zeros_(module.weight)  # an unfitted head says 0.5 everywhere
            init.zeros_(module.bias)
        elif isinstance(module, CTMRotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            if module.rope_type != "default":
                inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        else:
            super()._init_weights(module)


@dataclass
class CTMModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `tick_hidden_states` (B, T, K, D): the final-normed residual stream after each
    tick of the last layer, when that layer thinks (the last tick equals `last_hidden_state`)."""

    tick_hidden_states: torch.Tensor | None = None


class CTMModel(CTMPreTrainedModel):
    def __init__(self, config: CTMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.token_shift = CTMTokenShift(config) if config.ctm_token_shift == "embedding" else None
        self.token_memory = CTMTokenMemory(config) if config.ctm_token_memory == "token" else None
        self.layers = nn.ModuleList(
            [CTMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = CTMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = CTMRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.tick_observers: dict[int, CTMTickObserver] = {}  # one registry, shared by every block
        for layer in self.layers:
            if layer.is_thinking:
                layer.thinking.observers = self.tick_observers
        self.post_init()

    @property
    def last_layer_thinks(self) -> bool:
        return self.layers[-1].is_thinking

    # transformers 5.24 renamed `past_key_values` to `cache`; the old spelling must not be silently ignored
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        surprise_weight: torch.Tensor | None = None,
        return_tick_states: bool | None = None,
        start_layer: int = 0,
        **kwargs,
    ) -> CTMModelOutputWithPast:
        r"""
        surprise_weight (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Per-token weight on the synchronisation update (the seed's "dopamine"); 1 everywhere changes nothing.
        return_tick_states (`bool`, *optional*):
            Return `tick_hidden_states` when the last layer thinks. Defaults to True.
        start_layer (`int`, *optional*, defaults to 0):
            Run layers `start_layer..` only, `inputs_embeds` being the residual stream entering that layer (a frozen
            trunk's cached output); 0 is the whole model.
        """
        if not 0 <= start_layer < self.config.num_hidden_layers or (start_layer and self.token_shift is not None):
            raise ValueError(f"start_layer={start_layer!r} is invalid: allowed values are 0..{len(self.layers) - 1} "
                             "(only 0 with ctm_token_shift='embedding')")  # fmt: skip
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if cache is not None and not isinstance(cache, CTMCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"CTM models need a CTMCache; got a filled {type(cache).__name__}.")
            # an empty cache of another type (e.g. built by a generic caller) is replaced; a static one (generate's
            # `cache_implementation="static"`) by the static CTM layout of the same room
            cache = CTMCache(self.config, max_cache_len=cache.get_max_length()) if cache.is_compileable else None
        self.check_inputs(input_ids, inputs_embeds, attention_mask, cache, surprise_weight)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]

        if use_cache and cache is None:
            cache = CTMCache(self.config)
        if (
            cache is not None
            and self.gradient_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and self.config.ctm_carry == "chunk"
            and self.config.ctm_layer_indices
        ):
            raise ValueError(
                "Layer-level activation checkpointing drops the cache, and with ctm_carry='chunk' the cache carries "
                "the thinking state. Use CTMConfig.ctm_tick_checkpointing=True instead, or call without a cache."
            )

        # a static cache counts its positions in a tensor (no recompilation per step): keep it a tensor here
        past_length = cache.get_seq_length() if cache is not None else 0
        key_length = cache.max_cache_len if cache is not None and cache.is_static else None
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past_length).unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        schedule = None
        if self.config.ctm_layer_indices:
            token_mask, key_mask = thinking_masks(attention_mask, B, T, past_length, key_length)
            schedule = plan_thinking(
                self.config,
                B,
                T,
                inputs_embeds.device,
                token_mask,
                key_mask,
                past_length,
                cache.seen_tokens if cache is not None else None,
                key_length,
            )
        return_tick_states = True if return_tick_states is None else return_tick_states
        record_last_ticks = return_tick_states and self.last_layer_thinks
        hidden_states = inputs_embeds
        if self.token_shift is not None:
            carried = cache.previous_embeds if cache is not None else None
            shifted_mask = new_token_mask(attention_mask, T)
            hidden_states, last_embeds = self.token_shift(hidden_states, shifted_mask, carried)
            if cache is not None:
                cache.previous_embeds = last_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        tick_residuals = None
        for decoder_layer in self.layers[start_layer : self.config.num_hidden_layers]:
            hidden_states, tick_residuals = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                thinking_schedule=schedule,
                surprise_weight=surprise_weight,
                record_ticks=record_last_ticks and decoder_layer.layer_idx == self.config.num_hidden_layers - 1,
                **kwargs,
            )
        if cache is not None and schedule is not None:
            cache.record_new_tokens(schedule.new_tokens)

        if tick_residuals is not None:
            tick_hidden_states = self.norm(tick_residuals)
            if self.token_memory is not None:
                tick_hidden_states = tick_hidden_states + self.token_memory(input_ids, tick_hidden_states.dtype)[:, :, None]
            hidden_states = tick_hidden_states[:, :, -1]
        else:
            tick_hidden_states = None
            hidden_states = self.norm(hidden_states)
            if self.token_memory is not None:
                hidden_states = hidden_states + self.token_memory(input_ids, hidden_states.dtype)
        return CTMModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, tick_hidden_states=tick_hidden_states
        )

    def check_inputs(self, input_ids, inputs_embeds, attention_mask, cache, surprise_weight) -> None:
        """Refuse bad input before any work, with the argument, the value and what is allowed (`checks_ctm.py`)."""
        validate_inputs(self, input_ids, inputs_embeds, attention_mask, cache, surprise_weight)


@dataclass
class CTMCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus what the ticks did, when the last layer thinks.

    certainty (B, T, K): 1 - normalised entropy of each tick's prediction. selected_tick (B, T): the tick `logits`
    were read from (`config.ctm_readout`; None for `"tick_mixture"`, which reads all ticks). With labels: `tick_losses` (K,) mean CE per tick, and the mean CE of three
    readouts side by side, so the deployable number is never hidden behind the training objective:
    `loss_final_tick`, `loss_most_certain_tick`, `loss_argmin_tick` (the optimistic one), `loss_tick_mixture`, plus
    `tick_argmin_fraction` (K,) how often each tick was the lowest-loss tick.
    """

    certainty: torch.Tensor | None = None
    selected_tick: torch.Tensor | None = None
    tick_losses: torch.Tensor | None = None
    tick_argmin_fraction: torch.Tensor | None = None
    loss_final_tick: torch.Tensor | None = None
    loss_most_certain_tick: torch.Tensor | None = None
    loss_argmin_tick: torch.Tensor | None = None
    loss_tick_mixture: torch.Tensor | None = None


class CTMForCausalLM(CTMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CTMConfig):
        super().__init__(config)
        self.model = CTMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # fitted afterwards on frozen features (training/confidence.py); read by generate(output_confidence=True)
        self.confidence_head = CTMConfidenceHead(config) if config.ctm_confidence_head != "none" else None
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() builds nothing; forward builds a CTMCache

    @classmethod
    def from_llama(cls, model_or_path, gguf_file: str | None = None, dtype=torch.float32, **ctm_fields):
        """A Llama-family checkpoint (a `LlamaForCausalLM`, a local folder or a Hub id; `gguf_file` for a GGUF file in
        that folder) as a `CTMForCausalLM`: the same function with `ctm_layers="none"` (the default), silent blocks
        beside the MLPs with thinking layers (see `CTMConfig.from_llama_config`). Weights and generation config are
        copied; the tokenizer is the checkpoint's own (`AutoTokenizer.from_pretrained(model_or_path)`)."""
        check = lambda config: CTMConfig.from_llama_config(config, **ctm_fields)  # noqa: E731  (before any weight)
        llama = load_llama(model_or_path, gguf_file=gguf_file, dtype=dtype, check_config=check)
        model = cls(CTMConfig.from_llama_config(llama.config, **ctm_fields)).to(dtype)
        missing, unexpected = model.load_state_dict(ctm_state_dict_from_llama(llama.state_dict(), llama.config), False)
        thinking = tuple(f"model.layers.{i}." for i in model.config.ctm_layer_indices)
        missing = [k for k in missing if not (k.startswith(thinking) and ".thinking." in k)]
        dropped = model.config.ctm_mlp == "replace"  # a replaced MLP's weights are left behind
        unexpected = [k for k in unexpected if not (dropped and k.startswith(thinking) and ".mlp." in k)]
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not fit its converted model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")  # fmt: skip
        model.generation_config = GenerationConfig.from_dict(llama.generation_config.to_dict())
        return model

    # The eager glue of a compiled model: `torch.compile(model)` and `model.compile()` (what
    # `TrainingArguments(torch_compile=True)` does) compile what `Module.__call__` runs, so a frame skipped here
    # refuses a user's bad input with the eager message, and the compiled forward reads no tensor value: no break.
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        args, kwargs = self.check_call(args, kwargs)
        return super().__call__(*args, **kwargs)

    @torch.compiler.disable  # with what it calls: the frames the glue skips, or it would compile them
    def check_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The checks of `forward` that read tensor values, run eagerly; returns the arguments to call it with."""
        return validate_call(self, args, kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        surprise_weight: torch.Tensor | None = None,
        **kwargs,
    ) -> CTMCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Labels for language modeling (shifted inside, like every causal LM); -100 is ignored. When the last layer
            thinks, the loss is the multi-tick loss (see `multi_tick_loss`).
        surprise_weight (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Per-token weight on the synchronisation update (the seed's "dopamine"); None or 1 changes nothing.
        """
        if labels is not None:
            tokens = input_ids if input_ids is not None else inputs_embeds
            self.check_labels(labels, tokens, kwargs.get("ignore_index", -100))
        outputs: CTMModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            surprise_weight=surprise_weight,
            **kwargs,
        )
        if outputs.tick_hidden_states is None:
            hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
            logits = self.lm_head(hidden_states)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            result = CTMCausalLMOutputWithPast(
                loss=loss,
                logits=logits,
                cache=outputs.cache,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        else:
            result = self._read_ticks(outputs, labels, logits_to_keep, **kwargs)
        if self.model.tick_observers:
            event = CTMOutputEvent(
                input_ids, attention_mask, labels, result.logits, result.certainty, result.selected_tick
            )
            for observer in list(self.model.tick_observers.values()):
                observer.on_output(event)
        return result

    def _read_ticks(self, outputs, labels, logits_to_keep, **kwargs) -> CTMCausalLMOutputWithPast:
        """The head of a model whose last layer thinks: every tick's logits, their certainty, the readout
        `config.ctm_readout` serves, and with labels the multi-tick loss and every readout's loss side by side."""
        tick_logits = self.lm_head(slice_logits_to_keep(outputs.tick_hidden_states, logits_to_keep))  # (B, T, K, V)
        # the log-softmax needs a graph for the loss, and for the tick-mixture readout, whose logits are made of it
        mixture = self.config.ctm_readout == "tick_mixture"
        with torch.set_grad_enabled(torch.is_grad_enabled() and (labels is not None or mixture)):
            tick_log_probs = F.log_softmax(tick_logits.float(), dim=-1)
        certainty = tick_certainty(log_probs=tick_log_probs)
        if mixture:
            # no single tick is read: the mean of the K distributions (log-probs), which never loses more than log K
            # nats to the best tick and does not bet on one tick's certainty off the training distribution
            selected_tick = None
            logits = (torch.logsumexp(tick_log_probs, dim=2) - math.log(tick_log_probs.shape[2])).to(tick_logits.dtype)
        else:
            if self.config.ctm_readout == "most_certain":
                selected_tick = certainty.argmax(-1)
            else:
                # the last tick run (a block may run another tick count than the config's, e.g. at inference)
                selected_tick = torch.full(certainty.shape[:2], tick_logits.shape[2] - 1, device=certainty.device)
            logits = tick_logits.gather(2, selected_tick[..., None, None].expand(-1, -1, 1, tick_logits.shape[-1]))
            logits = logits[:, :, 0]

        result = CTMCausalLMOutputWithPast(
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            certainty=certainty,
            selected_tick=selected_tick,
        )
        if labels is not None:
            if tick_logits.shape[1] != labels.shape[1] and kwargs.get("shift_labels") is None:
                raise ValueError("labels need logits for every position: call with logits_to_keep=0")
            terms = multi_tick_loss(
                tick_log_probs,
                certainty,
                labels,
                argmin_weight=self.config.ctm_loss_argmin_weight,
                certain_weight=self.config.ctm_loss_certain_weight,
                tick_aux_weight=self.config.ctm_loss_tick_aux_weight,
                mixture_weight=self.config.ctm_loss_mixture_weight,
                **kwargs,
            )
            for term in fields(terms):  # MultiTickLoss's fields are output fields of the same name
                setattr(result, term.name, getattr(terms, term.name))
        return result

    def check_labels(self, labels: torch.Tensor, tokens: torch.Tensor, ignore_index: int = -100) -> None:
        """Labels must match the tokens' (batch, sequence) and hold ids < vocab_size or `ignore_index`."""
        validate_labels(labels, tokens, self.config.vocab_size, ignore_index)

    def generate(self, *args, output_certainty: bool = False, output_confidence: bool = False, **kwargs):
        r"""`GenerationMixin.generate`, plus `output_certainty=True` (with `return_dict_in_generate=True`): the output
        then also holds, for every generated token (aligned with the last columns of `sequences`, and traced
        through the beams under beam search):

        - `certainty` (batch, new_tokens): the certainty of the tick the token was read from,
        - `selected_tick` (batch, new_tokens): that tick,
        - `sync_divergence` (batch, new_tokens, n_thinking_layers, K): per thinking layer and tick,
          ||S_out,k - S_out,k-1|| of the position that predicted the token (tick 0 against its entry state).

        `output_confidence=True` (a model with a confidence head): `confidence` (batch, new_tokens), the head's
        P(this token is right), aligned the same way.

        Gathered by tick observers for the duration of the call; without either flag nothing is observed.
        """
        self.check_decoding_mode(args[1] if len(args) > 1 else kwargs.get("generation_config"), kwargs)
        if not (output_certainty or output_confidence):
            return super().generate(*args, **kwargs)
        if output_certainty and not self.model.last_layer_thinks:
            raise ValueError("output_certainty=True needs a model whose last layer thinks (CTMConfig.ctm_layers)")
        if output_confidence and self.confidence_head is None:
            raise ValueError("output_confidence=True needs a confidence head (CTMConfig.ctm_confidence_head='linear')")
        config = kwargs.get("generation_config") or self.generation_config
        if not kwargs.get("return_dict_in_generate", config.return_dict_in_generate):
            raise ValueError(
                "output_certainty / output_confidence need return_dict_in_generate=True (the values ride on the output)"
            )
        recorders = []
        if output_certainty:
            recorders.append(CTMGenerationCertainty(self.config.ctm_layer_indices, self.config.ctm_ticks))
        if output_confidence:
            recorders.append(CTMConfidenceRecorder(self.config, self.confidence_head, last_only=True))
        with self.observing(*recorders):
            outputs = super().generate(*args, **kwargs)
        for recorder in recorders:
            for name, value in recorder.aligned(getattr(outputs, "beam_indices", None)).items():
                outputs[name] = value
        return outputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # beams and num_return_sequences repeat the prompt's rows; a carried cache must repeat its rows with them
        # (transformers expands tensors only), or the second turn of a beam search meets a one-row state
        cache = model_kwargs.get("cache")
        rows = input_ids.shape[0] if input_ids is not None else None
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if expand_size > 1 and isinstance(cache, CTMCache) and rows is not None and cache.batch_size == rows:
            cache.batch_repeat_interleave(expand_size)
        return input_ids, model_kwargs

    SUPPORTED_DECODING = SUPPORTED_DECODING

    def check_decoding_mode(self, generation_config: GenerationConfig | None, kwargs: dict) -> None:
        """Refuse the decoding modes a stateful model cannot run (assisted decoding rolls the cache back)."""
        validate_decoding_mode(self.generation_config, generation_config, kwargs)

    def add_token_memory(self) -> CTMTokenMemory:
        """Give this model the fast-weight token memory in place (`ctm_token_memory="token"`), its slots empty, so it
        computes exactly what it did until phase 4's delta rule writes them; as `resize_token_embeddings` changes the
        model it is called on. The slots are left out of the optimiser (`requires_grad=False`: the rule writes them).
        A model that has the memory already keeps it."""
        if self.model.token_memory is None:
            reference = self.model.embed_tokens.weight
            memory = CTMTokenMemory(self.config).to(device=reference.device, dtype=reference.dtype)
            nn.init.zeros_(memory.weight)
            memory.weight.requires_grad_(False)
            self.model.token_memory = memory
            self.config.ctm_token_memory = "token"
        return self.model.token_memory

    def compile_ticks(self, **compile_kwargs) -> "CTMForCausalLM":
        """Compile the tick function of every CTM block with `torch.compile(**compile_kwargs)` (the tick is where
        the time goes; the schedule around it stays eager so any carry plan works)."""
        for layer in self.model.layers:
            if layer.is_thinking:
                layer.thinking.tick = torch.compile(layer.thinking.tick, **compile_kwargs)
        return self

    @torch.no_grad()
    def probe(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        intervention: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None,
        **kwargs,
    ) -> tuple[CTMCausalLMOutputWithPast, dict[int, CTMLayerProbe]]:
        """Neuroimaging of one forward pass: for every CTM layer and tick the state, its change, the readout
        synchronisation and the certainty of the logit lens (final norm + lm_head on the residual after that tick).

        `intervention(layer_idx, tick, state) -> new_state | None` may replace the post-activation state at tick k.
        Returns the model output and `{layer_idx: CTMLayerProbe}`.
        """
        with self.observing(CTMProbeRecorder(intervention)) as recorder:
            outputs = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        for layer in recorder.layers.values():
            residual = layer.residual.unsqueeze(2) + layer.tick_outputs
            layer.certainty = tick_certainty(self.lm_head(self.model.norm(residual)))
        return outputs, recorder.layers


__all__ = [
    "CTMBlock",
    "CTMCache",
    "CTMCacheLayer",
    "CTMCausalLMOutputWithPast",
    "CTMForCausalLM",
    "CTMGenerationCertainty",
    "CTMLayerEvent",
    "CTMLayerProbe",
    "CTMModel",
    "CTMObserverHandle",
    "CTMOutputEvent",
    "CTMPreTrainedModel",
    "CTMProbeRecorder",
    "CTMTickEvent",
    "CTMTickObserver",
    "CTMTokenShift",
    "ThinkingState",
    "multi_tick_loss",
    "next_token_labels",
    "tick_certainty",
]
