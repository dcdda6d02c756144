# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The model's input checks: bad input is refused before any work, with the argument, the value and what is allowed
(docs/errors.md lists every case and its message).

The checks are their own concern, apart from what the model computes: they read shapes and dtypes on every call
(host-side metadata, free) and tensor values (token ids, finiteness, label ids) only where that costs no host sync in
a training or decode step, and never while `torch.compile` traces (a value read breaks the graph; the eager glue of
`CTMForCausalLM.__call__` has checked the values before). `CTMModel.check_inputs`, `CTMForCausalLM.check_labels`,
`.check_call` and `.check_decoding_mode` are these functions applied to the model.

Travels with checkpoints as remote code (imported by `modeling_ctm.py`)."""

import copy
import inspect
import warnings

import torch

from .cache_ctm import CTMCache


# the decoding modes a CTM runs; assisted decoding rolls the cache back, which a carried thinking state cannot
SUPPORTED_DECODING = ("greedy_search", "sample", "beam_search", "beam_sample")


def validate_inputs(model, input_ids, inputs_embeds, attention_mask, cache, surprise_weight) -> None:
    """Refuse bad input to `model` (a `CTMModel`) before any work, with the argument, the value and what is allowed.

    Shapes and dtypes are checked on every call (they are host-side metadata). Values (token ids, finiteness) need
    a reduction, which on an accelerator is a host sync: they are checked when the tensor is on the CPU, and on an
    accelerator only at the prompt of a generation (empty cache, eval mode): once per `generate`, never per decode
    step or per training step.
    """
    config = model.config
    tokens = input_ids if input_ids is not None else inputs_embeds
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if tokens.dim() != (2 if input_ids is not None else 3):
        expected = "(batch, sequence)" if input_ids is not None else "(batch, sequence, hidden)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tokens.shape)}")
    if input_ids is None and getattr(config, "ctm_token_memory", "none") != "none":
        raise ValueError(
            f"ctm_token_memory={config.ctm_token_memory!r} reads input_ids (its slots are keyed by the token), got "
            "inputs_embeds only: pass input_ids, or use a model with ctm_token_memory='none'"
        )
    B, T = tokens.shape[:2]
    if T == 0:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}: an empty prompt; give every row >= 1 token")
    compiling = torch.compiler.is_compiling()
    past_length = cache.get_seq_length() if cache is not None else 0
    if isinstance(past_length, torch.Tensor) and not compiling:  # a static cache's counter
        past_length = int(past_length)
    # a compiled graph reads no values (a read breaks it): `CTMForCausalLM.forward` checks them eagerly first
    check_values = not compiling and (
        tokens.device.type == "cpu" or (cache is not None and past_length == 0 and not model.training)
    )
    if input_ids is not None and check_values:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids holds the token id {bad}: allowed ids are 0 .. vocab_size - 1 = "
                f"{config.vocab_size - 1} (was the tokenizer made for this model?)"
            )
    if inputs_embeds is not None and input_ids is None and check_values:
        if not bool(torch.isfinite(inputs_embeds).all()):
            raise ValueError("inputs_embeds holds NaN or infinite values: allowed are finite numbers")
    if cache is not None:
        rows = cache.batch_size
        if rows is not None and rows != B:
            raise ValueError(
                f"cache holds state for a batch of {rows}, but {name} has a batch of {B}: continue with the same "
                "rows, or start a new cache (`CTMCache.from_thinking_state(..., batch_size=B)` repeats a snapshot)"
            )
        if cache.is_static and not compiling and past_length + T > cache.max_cache_len:
            raise ValueError(
                f"the static cache has room for max_cache_len={cache.max_cache_len} positions, and {past_length} "
                f"are cached: {T} more do not fit; build the cache with a larger max_cache_len"
            )
    # a static cache's length is a tensor while compiling: the eager glue has checked the mask against it
    if attention_mask is not None and attention_mask.dim() == 2 and not isinstance(past_length, torch.Tensor):
        if attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past_length + T):
            allowed = f"({B}, {T})"
            if past_length:
                allowed += f" (new positions) or ({B}, {past_length + T}) (cached + new)"
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; allowed is {allowed}")
    if surprise_weight is not None:
        if tuple(surprise_weight.shape) != (B, T):
            raise ValueError(
                f"surprise_weight must have shape (batch, sequence) = {(B, T)}, got {tuple(surprise_weight.shape)}"
            )
        # a negative weight can drive the accumulators' beta to 0 and the synchronisation to inf
        if check_values and not bool((torch.isfinite(surprise_weight) & (surprise_weight >= 0)).all()):
            raise ValueError(
                "surprise_weight holds a negative, NaN or infinite value: allowed are finite numbers >= 0"
            )
    length = past_length + T
    if not compiling and length > config.max_position_embeddings and not getattr(model, "_warned_too_long", False):
        model._warned_too_long = True  # one warning per model, not one per decode step
        # stacklevel 4: past this function, `CTMModel.check_inputs` and `forward`, where the model was called
        warnings.warn(
            f"the sequence has {length} positions, more than max_position_embeddings="
            f"{config.max_position_embeddings} the model was made for: positions beyond it are untrained "
            "and the output may degrade",
            stacklevel=4,
        )


def validate_labels(labels: torch.Tensor, tokens: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Labels must match the tokens' (batch, sequence) and hold ids < vocab_size or `ignore_index`; the values are
    checked when the labels are on the CPU (no host sync in a training step on an accelerator)."""
    if labels.is_floating_point():
        raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}; allowed is the tokens' (batch, sequence) = "
            f"{tuple(tokens.shape[:2])}"
        )
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        real = labels[labels != ignore_index]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
            bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
            raise ValueError(
                f"labels holds the id {bad}: allowed are 0 .. vocab_size - 1 = {vocab_size - 1}, "
                f"or {ignore_index} (ignored)"
            )


def validate_call(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The checks of `model.forward` (a `CTMForCausalLM`) that read tensor values, run eagerly before a compiled
    forward; returns the arguments to call it with."""
    call = inspect.signature(model.forward).bind(*args, **kwargs)
    arguments = call.arguments
    input_ids, inputs_embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
    labels, attention_mask, cache = arguments.get("labels"), arguments.get("attention_mask"), arguments.get("cache")
    tokens = input_ids if input_ids is not None else inputs_embeds
    if labels is not None and tokens is not None:
        model.check_labels(labels, tokens, arguments.get("kwargs", {}).get("ignore_index", -100))
    # the order of `CTMModel.forward`, which repeats the checks (the value checks only when not compiled)
    if tokens is not None and (input_ids is None or inputs_embeds is None):
        if cache is None or isinstance(cache, CTMCache):
            model.model.check_inputs(input_ids, inputs_embeds, attention_mask, cache, arguments.get("surprise_weight"))
        # an all-real padding mask means what no mask means (`thinking_masks` in cache_ctm.py decides the same):
        # dropping it here spares the compiled graph that read
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and not model.model.tick_observers
            and bool(attention_mask.all())
        ):
            arguments["attention_mask"] = None
    return call.args, call.kwargs


def validate_decoding_mode(default_config, generation_config, kwargs: dict) -> None:
    """Refuse, before transformers' own checks, the decoding modes a stateful model cannot run: assisted decoding
    (an assistant model, prompt lookup, early exit, multi-token prediction) verifies drafted tokens and then rolls
    the cache back, and the carried thinking state cannot be rolled back; the remaining modes are not tested.
    `default_config` is the model's own generation config, used when the call gives none."""
    config = copy.deepcopy(generation_config if generation_config is not None else default_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode == "assisted_generation":
        raise ValueError(
            "assisted decoding (assistant_model, prompt_lookup_num_tokens, assistant_early_exit, use_mtp) is "
            "not supported: it rolls the cache back after verifying drafted tokens, and a CTM's carried "
            "thinking state is stateful and cannot be rolled back. Decode without it"
        )
    if mode not in SUPPORTED_DECODING:
        raise ValueError(
            f"decoding mode {mode.value!r} is not supported by a CTM (its carried thinking state must follow every "
            f"step): allowed are {', '.join(SUPPORTED_DECODING)}"
        )
