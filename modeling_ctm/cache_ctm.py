# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The thinking state and the cache: what one tick reads and writes, what the cache carries between positions
(self-attention KV, the CTM cross-attention K/V, the carried thinking state), and the carry schedule that decides
which tokens think together, in which order, from which state.

Travels with checkpoints as remote code (imported by `modeling_ctm.py`)."""

import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from safetensors.torch import save_file
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from .configuration_ctm import CTMConfig
from .io_ctm import atomic_write, load_safetensors_file


def read_synchronisation(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """S = alpha / sqrt(beta): what a pair of accumulators of a `ThinkingState` reads as (the synchronisation)."""
    return alpha * torch.rsqrt(beta)


def sync_convergence(before: "ThinkingState", after: "ThinkingState") -> torch.Tensor:
    """1 - ||S_out,k - S_out,k-1|| / ||S_out,k||, clamped to [0, 1], per token: how settled the readout
    synchronisation is. The block's own certainty: every thinking layer has it, and it costs O(S_out) per token
    where the logit lens would cost a vocabulary projection per tick."""
    new = read_synchronisation(after.alpha_out, after.beta_out)
    old = read_synchronisation(before.alpha_out, before.beta_out)
    return (1 - (new - old).norm(dim=-1) / new.norm(dim=-1).clamp_min(1e-12)).clamp(0, 1)


@dataclass
class ThinkingState:
    """The recurrent state of one CTM layer. Leading dims are any batch shape, e.g. (B,) or (B, T).

    `state` is the post-activation z (…, D); `trace` holds the last M pre-activations (…, D, M); the four
    synchronisation accumulators (…, S) are always float32 so long carries neither saturate nor lose increments.
    """

    state: torch.Tensor
    trace: torch.Tensor
    alpha_out: torch.Tensor
    beta_out: torch.Tensor
    alpha_action: torch.Tensor
    beta_action: torch.Tensor

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ThinkingState":
        return ThinkingState(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def where(condition: torch.Tensor, if_true: "ThinkingState", if_false: "ThinkingState") -> "ThinkingState":
        """Pick per batch row (`condition` (B,)) or per token (`condition` (B, n) for states (B, n, ...))."""

        def pick(a, b):
            mask = condition.view(*condition.shape, *([1] * (max(a.dim(), b.dim()) - condition.dim())))
            return torch.where(mask, a, b)

        # fields of the instance, not of the class: dynamo traces the former and breaks the graph on the latter
        return ThinkingState(
            **{f.name: pick(getattr(if_true, f.name), getattr(if_false, f.name)) for f in fields(if_true)}
        )

    def expand_tokens(self, n: int) -> "ThinkingState":
        """(B, ...) -> (B, n, ...): every token of a chunk starts from the same state."""
        return self.map(lambda t: t.unsqueeze(1).expand(t.shape[0], n, *t.shape[1:]))

    def select_tokens(self, index: torch.Tensor) -> "ThinkingState":
        """(B, n, ...) -> (B, ...): the state of token `index[b]` of each row."""
        rows = torch.arange(index.shape[0], device=index.device)
        return self.map(lambda t: t[rows, index])

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "ThinkingState":
        missing = [prefix + f.name for f in fields(cls) if prefix + f.name not in tensors]
        if missing:
            raise ValueError(f"thinking-state tensors are missing the keys {missing}")
        return cls(**{f.name: tensors[prefix + f.name] for f in fields(cls)})


# ----------------------------------------------------------------------------------------------------------------------
# Cache: self-attention KV + CTM cross-attention K/V + the carried thinking state.
# ----------------------------------------------------------------------------------------------------------------------


class CTMCacheLayer(DynamicLayer):
    """One decoder layer's cache. The self-attention KV lives in `keys`/`values` (inherited); a CTM layer also keeps
    the K/V of its cross-attention over all earlier positions (`observed_keys`/`observed_values`), the final thinking
    state of the last real token (`last`) and the state the current chunk entered with (`entry`)."""

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.observed_keys: torch.Tensor | None = None
        self.observed_values: torch.Tensor | None = None
        self.last: ThinkingState | None = None
        self.entry: ThinkingState | None = None

    def update_observations(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observed_keys is not None:
            keys = torch.cat([self.observed_keys, keys], dim=-2)
            values = torch.cat([self.observed_values, values], dim=-2)
        self.observed_keys, self.observed_values = keys, values
        return keys, values

    def _map_extra(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.observed_keys is not None:
            self.observed_keys, self.observed_values = fn(self.observed_keys), fn(self.observed_values)
        if self.last is not None:
            self.last = self.last.map(fn)
        if self.entry is not None:
            self.entry = self.entry.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_extra(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_extra(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_extra(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.observed_keys = self.observed_values = None
        self.last = self.entry = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("A CTM cache cannot be cropped: the carried thinking state cannot be rolled back.")

    def offload(self) -> None:
        super().offload()
        self._map_extra(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized:
            self._map_extra(lambda t: t.to(self.device, non_blocking=True))

    def drop_attention(self) -> None:
        """Forget every earlier position's keys and values; keep the thinking state."""
        DynamicLayer.reset(self)
        self.observed_keys = self.observed_values = None

    def detach_(self) -> None:
        if self.is_initialized and self.keys is not None:
            self.keys, self.values = self.keys.detach(), self.values.detach()
        self._map_extra(lambda t: t.detach())


class CTMStaticCacheLayer(StaticLayer):
    """A `CTMCacheLayer` with a static layout (`CTMCache(config, max_cache_len=N)`): the self-attention KV and the
    cross-attention K/V live in tensors of N positions, allocated at the first call and written in place at the
    position a tensor counter holds. Every decode step then has the same shapes, so a compiled step neither breaks
    nor recompiles as the sequence grows (transformers' `StaticLayer`, which it extends, does the same for KV)."""

    is_croppable = False

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.observed_keys: torch.Tensor | None = None
        self.observed_values: torch.Tensor | None = None
        # a tensor, like `cumulative_length`: a Python int would be a new constant (a recompile) every step
        self.observed_length = torch.tensor(0, dtype=torch.long)
        self.last: ThinkingState | None = None
        self.entry: ThinkingState | None = None

    def update_observations(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observed_keys is None:
            B, H, _, HD = keys.shape
            self.observed_keys = keys.new_zeros(B, H, self.max_cache_len, HD)
            self.observed_values = values.new_zeros(B, H, self.max_cache_len, values.shape[-1])
            self.observed_length = self.observed_length.to(keys.device)
            if not torch.compiler.is_compiling():  # a fixed address, as `StaticLayer` marks its KV (CUDA graphs)
                for tensor in (self.observed_keys, self.observed_values, self.observed_length):
                    torch._dynamo.mark_static_address(tensor)
        position = torch.arange(keys.shape[-2], device=keys.device) + self.observed_length
        self.observed_length.add_(keys.shape[-2])
        self.observed_keys.index_copy_(2, position, keys)
        self.observed_values.index_copy_(2, position, values)
        return self.observed_keys, self.observed_values

    def _map_extra(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        CTMCacheLayer._map_extra(self, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys, self.values = (t.index_select(0, beam_idx.to(t.device)) for t in (self.keys, self.values))
        self._map_extra(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys, self.values = (t.repeat_interleave(repeats, dim=0) for t in (self.keys, self.values))
            self.batch_size = self.keys.shape[0]
        self._map_extra(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.batch_size = self.keys.shape[0]
        self._map_extra(lambda t: t[indices])

    def reset(self) -> None:
        self.drop_attention()
        self.last = self.entry = None

    def crop(self, tokens_to_remove: int) -> None:
        CTMCacheLayer.crop(self, tokens_to_remove)

    def drop_attention(self) -> None:
        """Forget every earlier position's keys and values (zeroed in place, counters back to 0); keep the state."""
        StaticLayer.reset(self)
        if self.observed_keys is not None:
            self.observed_keys.zero_()
            self.observed_values.zero_()
        self.observed_length.zero_()

    def detach_(self) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys.detach(), self.values.detach()
        self._map_extra(lambda t: t.detach())


class CTMCache(Cache):
    """Everything a decode step needs: per layer the self-attention KV; per CTM layer the cross-attention K/V of all
    earlier positions and the recurrent thinking state; and per row the number of real (non-padding) tokens seen,
    which places chunk boundaries. Not croppable: assisted decoding is refused (the model is stateful).

    A new conversation can start from a thinking-state snapshot with no KV (`from_thinking_state`): that is how
    memory crosses conversations.

    `max_cache_len=N` gives the static layout (`CTMStaticCacheLayer`): room for N positions allocated up front, the
    shapes of every decode step fixed, and so a compiled decode step with no graph break and no recompilation as the
    sequence grows. None (the default) grows the cache position by position.
    """

    def __init__(
        self,
        config: CTMConfig | None = None,
        num_hidden_layers: int | None = None,
        max_cache_len: int | None = None,
    ):
        n = num_hidden_layers if num_hidden_layers is not None else config.num_hidden_layers
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(
                f"max_cache_len={max_cache_len!r} is invalid: allowed are None (a growing cache) or an int >= 1 "
                "(the static layout's room in positions)"
            )
        self.max_cache_len = max_cache_len
        layers = [CTMCacheLayer() if max_cache_len is None else CTMStaticCacheLayer(max_cache_len) for _ in range(n)]
        super().__init__(layers=layers)
        self.seen_tokens: torch.Tensor | None = None  # (B,) real tokens consumed per row
        # (B, D) the input embedding of each row's last real token (`ctm_token_shift`): the next token's x_{t-1}
        self.previous_embeds: torch.Tensor | None = None

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_static(self) -> bool:
        return self.max_cache_len is not None

    def record_new_tokens(self, new_tokens: torch.Tensor) -> None:
        self.seen_tokens = new_tokens if self.seen_tokens is None else self.seen_tokens + new_tokens

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a per-row operation to the model-level fields (the layers have their own)."""
        if self.seen_tokens is not None:
            self.seen_tokens = fn(self.seen_tokens)
        if self.previous_embeds is not None:
            self.previous_embeds = fn(self.previous_embeds)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = self.previous_embeds = None

    def detach_(self) -> "CTMCache":
        """Cut the autograd graph at this point (truncated backpropagation through the carried state)."""
        for layer in self.layers:
            layer.detach_()
        if self.previous_embeds is not None:
            self.previous_embeds = self.previous_embeds.detach()
        return self

    def drop_attention_(self) -> "CTMCache":
        """Forget the keys/values of every earlier position (and the token shift's previous embedding, which is an
        earlier position's input too) but keep the thinking state and the token count. After this, the only path
        from the past to the future is the carried thinking state (phase-3 'attention cut'), as after a snapshot."""
        for layer in self.layers:
            layer.drop_attention()
        self.previous_embeds = None
        return self

    # -- snapshots -----------------------------------------------------------------------------------------------------

    def thinking_state_dict(self) -> dict[str, torch.Tensor]:
        """The final thinking state of every CTM layer as a flat dict `{"layers.{i}.{field}": tensor}` (batch-first),
        ready for `safetensors.torch.save_file`. A new sequence started from it (`from_thinking_state`) begins a new
        chunk from exactly this state. Like the KV, the token shift's previous embedding is not in it: a new sequence
        has no previous token."""
        tensors = {}
        for idx, layer in enumerate(self.layers):
            if layer.last is not None:
                tensors.update(layer.last.map(lambda t: t.detach().contiguous()).to_dict(f"layers.{idx}."))
        if not tensors:
            raise ValueError("This cache holds no thinking state yet: run the model on at least one token first.")
        return tensors

    @classmethod
    def from_thinking_state(
        cls,
        config: CTMConfig,
        tensors: dict[str, torch.Tensor],
        batch_size: int | None = None,
        max_cache_len: int | None = None,
    ) -> "CTMCache":
        """A fresh cache (no KV, no tokens seen) whose CTM layers start from `tensors` (see `thinking_state_dict`).
        A snapshot of batch 1 is repeated to `batch_size` rows; `max_cache_len` as in `CTMCache`."""
        if config.ctm_carry != "chunk":
            raise ValueError(
                "Starting from a thinking-state snapshot needs CTMConfig.ctm_carry='chunk'; with ctm_carry="
                f"{config.ctm_carry!r} every token starts from the learned start state."
            )
        cache = cls(config, max_cache_len=max_cache_len)
        D, M = config.hidden_size, config.ctm_memory_length
        expected = {
            "state": (D,),
            "trace": (D, M),
            "alpha_out": (config.ctm_n_synch_out,),
            "beta_out": (config.ctm_n_synch_out,),
            "alpha_action": (config.ctm_n_synch_action,),
            "beta_action": (config.ctm_n_synch_action,),
        }
        for idx in config.ctm_layer_indices:
            state = ThinkingState.from_dict(tensors, f"layers.{idx}.")
            rows = state.state.shape[0]
            for name, shape in expected.items():
                got = tuple(getattr(state, name).shape)
                if got != (rows, *shape):
                    raise ValueError(
                        f"thinking-state tensor layers.{idx}.{name} has shape {got}; this model (hidden_size={D}, "
                        f"ctm_memory_length={M}, ctm_n_synch_out={config.ctm_n_synch_out}, ctm_n_synch_action="
                        f"{config.ctm_n_synch_action}) needs (batch, {', '.join(map(str, shape))}): the snapshot "
                        "comes from a model of another shape."
                    )
            if batch_size is not None and rows != batch_size:
                if rows != 1:
                    raise ValueError(f"a snapshot of batch {rows} cannot start a batch of {batch_size}")
                state = state.map(lambda t: t.expand(batch_size, *t.shape[1:]).contiguous())
            cache.layers[idx].last = cache.layers[idx].entry = state
        extra = {k for k in tensors if int(k.split(".")[1]) not in config.ctm_layer_indices}
        if extra:
            raise ValueError(f"the snapshot has layers this model does not think in: {sorted(extra)[:4]}")
        return cache

    def save_thinking_state(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write `thinking_state_dict()` to a safetensors file atomically (see `atomic_write`)."""
        tensors = self.thinking_state_dict()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load_thinking_state(
        cls, path: str | os.PathLike, config: CTMConfig, batch_size: int | None = None, device=None
    ) -> "CTMCache":
        tensors = load_safetensors_file(path, device=str(device or "cpu"), require_finite=True)
        try:
            return cls.from_thinking_state(config, tensors, batch_size)
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from error

    @property
    def batch_size(self) -> int | None:
        """Rows this cache holds state for (None while empty): read from shapes, so no device sync."""
        if self.seen_tokens is not None:
            return self.seen_tokens.shape[0]
        for layer in self.layers:
            if layer.last is not None:
                return layer.last.state.shape[0]
            keys = getattr(layer, "keys", None)
            if keys is not None and keys.numel():
                return keys.shape[0]
        return None


# ----------------------------------------------------------------------------------------------------------------------
# The carry schedule: which tokens think together, in which order, from which state.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ThinkingStep:
    """Tokens that think in parallel from one entry state per row: slot j of row b is column `columns[b, j]`."""

    columns: torch.Tensor  # (B, n) long
    valid: torch.Tensor  # (B, n) bool: slot holds a real token
    last_slot: torch.Tensor  # (B,) long: the row's last real token in this step
    has_tokens: torch.Tensor  # (B,) bool
    attention_mask: torch.Tensor | None  # (B, 1, n, past + T) bool, or None when `is_causal` suffices
    is_causal: bool
    contiguous: bool  # the same contiguous columns in every row, in order: outputs are concatenated, not scattered
    every_row: bool  # every row has a real token in this step: no per-row selection of the carried state


@dataclass
class ThinkingSchedule:
    steps: list[ThinkingStep]
    begins_new_chunk: torch.Tensor  # (B,) bool: the first new token starts a chunk (enters from `last`)
    new_tokens: torch.Tensor  # (B,) long: real tokens in this call


def new_token_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The real new tokens (B, T) bool from a 2D padding mask over the new or the cached + new positions (what the
    token shift reads); None when there is no 2D mask."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -length:].bool()


def thinking_masks(attention_mask, batch_size: int, length: int, past_length, key_length: int | None = None):
    """`plan_thinking`'s `token_mask` and `key_mask` from a 2D padding mask over past + new tokens: the real new
    tokens (B, T) and the real keys (B, past + T), or (B, key_length) for a static cache of that room (the room past
    the new tokens marked real: the causal rule masks it). (None, None) when nothing is padding."""
    B, T = batch_size, length
    if attention_mask is None or attention_mask.dim() != 2:
        return None, None
    mask = attention_mask.bool()
    if key_length is not None:  # static: `past_length` is a tensor; place the mask by shape alone
        if mask.shape[1] == T:  # over the new tokens only: the past was all real
            mask = mask.new_ones(B, key_length).index_copy(1, torch.arange(T, device=mask.device) + past_length, mask)
        else:
            mask = torch.cat([mask, mask.new_ones(B, key_length - mask.shape[1])], dim=1)
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None, None
        return attention_mask.bool()[:, -T:], mask
    if mask.shape[1] == T and past_length > 0:  # a mask over the new tokens only: the past was all real
        mask = torch.cat([mask.new_ones(B, past_length), mask], dim=1)
    if mask.shape[1] != past_length + T:
        raise ValueError(
            f"attention_mask covers {mask.shape[1]} positions; expected {past_length + T} (cached + new) or {T}."
        )
    # while compiling the masks stay (the same values as none); reading them would break the graph
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None, None
    return mask[:, past_length:], mask


def plan_thinking(
    config: CTMConfig,
    batch_size: int,
    length: int,
    device: torch.device,
    token_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    past_length: int | torch.Tensor,
    seen_tokens: torch.Tensor | None,
    key_length: int | None = None,
) -> ThinkingSchedule:
    """Split the T new tokens of every row into sequential steps following the carry rule.

    `token_mask` (B, T) marks the real new tokens and `key_mask` (B, past + T) the real keys; both are None when
    nothing is padding. `seen_tokens` (B,) counts the real tokens of earlier calls.

    Chunk boundaries are counted in real tokens from the first real token of the sequence, so left padding and the
    split of a sequence across calls do not move them. With `ctm_carry="none"` all tokens think in one parallel step.

    `key_length` is the static cache's room N (`CTMCache(max_cache_len=N)`): the keys are then N positions, of which
    the first `past_length` (a tensor) are cached, and `key_mask` covers all N. While compiling, nothing here reads a
    tensor's value: a padded chunk schedule takes its static upper bound of steps (an empty step changes nothing).
    """
    B, T = batch_size, length
    mask = token_mask if token_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    seen = seen_tokens if seen_tokens is not None else torch.zeros(B, dtype=torch.long, device=device)
    new_tokens = mask.sum(1)
    arange = torch.arange(T, device=device)

    if config.ctm_carry == "none":
        begins_new_chunk = torch.ones(B, dtype=torch.bool, device=device)
        slots = [(arange.expand(B, T), mask, True, True)]
    else:
        C = config.ctm_chunk_size
        begins_new_chunk = seen % C == 0
        compiling = torch.compiler.is_compiling()
        if T == 1:  # one new token (a decode step): one step of one slot wherever the rows stand, padded or not
            slots = [(arange.expand(B, 1), mask, True, True)]
        # without earlier calls every row starts at 0: known without reading a tensor, so training compiles unbroken
        elif token_mask is None and (seen_tokens is None or (not compiling and bool((seen == seen[0]).all()))):
            # every row at the same position, no padding (training, plain decoding): contiguous column ranges
            first = 0 if seen_tokens is None else int(seen[0])
            bounds = [0, *range(C - first % C if first % C else C, T, C), T]
            whole = len(bounds) == 2
            slots = [(arange[a:b].expand(B, b - a), mask[:, a:b], True, whole) for a, b in zip(bounds, bounds[1:])]
        else:
            positions = seen[:, None] + mask.cumsum(1) - 1  # real position of each new token
            chunk = positions // C
            step = chunk - (seen // C)[:, None]
            slot = positions - torch.maximum(seen[:, None], chunk * C)
            if compiling:
                # static bounds: T tokens from any offset in a chunk span at most this many chunks, C slots each; a
                # padding token is written to a spare cell past the end, so no shape depends on a value
                n_steps = (T + C - 2) // C + 1 if seen_tokens is not None else (T + C - 1) // C
                width = min(C, T)
                cell = torch.where(mask, (step * B + arange.new_tensor(range(B))[:, None]) * width + slot, -1)
                cell = torch.where(cell < 0, n_steps * B * width, cell).flatten()
                size = n_steps * B * width + 1
                columns = torch.zeros(size, dtype=torch.long, device=device).scatter(0, cell, arange.expand(B, T).flatten())
                valid = torch.zeros(size, dtype=torch.bool, device=device).scatter(0, cell, mask.flatten())
                columns, valid = columns[:-1].view(n_steps, B, width), valid[:-1].view(n_steps, B, width)
            else:
                n_steps = int(step[mask].max()) + 1 if bool(mask.any()) else 0
                width = int(slot[mask].max()) + 1 if n_steps else 1
                rows, cols = mask.nonzero(as_tuple=True)
                columns = torch.zeros(n_steps, B, width, dtype=torch.long, device=device)
                valid = torch.zeros(n_steps, B, width, dtype=torch.bool, device=device)
                columns[step[rows, cols], rows, slot[rows, cols]] = cols
                valid[step[rows, cols], rows, slot[rows, cols]] = True
            slots = [(columns[s], valid[s], False, False) for s in range(n_steps)]

    no_padding = key_mask is None  # `key_mask` is None unless some key is padding
    static = key_length is not None  # static keys: N positions, the cached ones first, then empty room
    steps = []
    every_row = token_mask is None  # the aligned fast path and unpadded `none` steps hold tokens in every row
    # (columns, valid, contiguous, covers_all): flags, not slices, so that a dynamic T is never compared in Python
    for columns, valid, contiguous, covers_all in slots:
        if covers_all and not static and past_length == 0 and no_padding:
            # causal over one token is no mask at all; compiled, a dynamic T would make `T > 1` a SymBool SDPA refuses
            attention_mask, is_causal = None, T > 1 if not torch.compiler.is_compiling() else True
        elif covers_all and not static and T == 1 and no_padding:
            attention_mask, is_causal = None, False
        else:
            if static:  # column of each key relative to the new tokens: < 0 cached, >= T empty (masked)
                key_columns = torch.arange(key_length, device=device) - past_length
            else:
                key_columns = arange.new_tensor(range(-past_length, T))  # < 0 for cached keys
            attention_mask = key_columns[None, None, :] <= columns[:, :, None]  # (B, n, past + T)
            if key_mask is not None:
                attention_mask = attention_mask & key_mask[:, None, :]
            # Slots without a real token still run (their outputs are dropped); give them a key so softmax is finite.
            attention_mask = (attention_mask | ~valid[:, :, None]).unsqueeze(1)
            is_causal = False
        last_slot = (valid.long().cumsum(1) * valid).argmax(1)
        has_tokens = valid.any(1)
        steps.append(
            ThinkingStep(
                columns, valid, last_slot, has_tokens, attention_mask, is_causal, contiguous,
                # while compiling, rows are picked by `where` (the same values) instead of reading `has_tokens`
                every_row=every_row or (not torch.compiler.is_compiling() and bool(has_tokens.all())),
            )
        )  # fmt: skip
    return ThinkingSchedule(steps=steps, begins_new_chunk=begins_new_chunk, new_tokens=new_tokens)
