"""Episodic memory: snapshots of the thinking state, keyed by what the conversation was about, that warm-start a new
conversation ("continuity of self is continuity of state").

An episode is a (key, value) pair:

* **key**: a unit vector computed from the stored text by a named key function (`KEY_FUNCTIONS`; padding never
  enters a key): `"mean_input_embedding"` (the default: the L2-normalised mean of the model's input-token embeddings,
  the seed's "no separate encoder"), `"centered_input_embedding"` (the same mean with the vocabulary's mean embedding
  removed: a one-word question finds the conversation that contains the word), `"last_hidden_state"` (the model's own
  final hidden state at the last real token), `"mean_hidden_state"` (the mean of its normalised final hidden
  states) or `"token_set"` (a hashed set of the text's token ids: lexical, independent of what the embeddings
  learned). Every key has the hidden size, so the stored shape does not depend on the choice.
* **value**: the whole thinking state of every thinking layer at the end of the stored text, in exactly the format
  of `CTMCache.thinking_state_dict()` (`layers.{i}.{state,trace,alpha_out,beta_out,alpha_action,beta_action}`).

Recall is cosine similarity against every stored key in one matrix product (no Python loop over episodes); the best
episode above a threshold becomes a fresh `CTMCache` (no KV) that `forward` and `generate` take as `cache=`.

Capacity is fixed. Rules, stated:

* **merge**: a new episode whose key has cosine >= `merge_threshold` with a stored one *replaces* that episode (key
  and value): thinking states are not averaged (the dynamics are non-linear, a mean of two states is neither), and
  the newer experience of the same topic is the more useful one. The slot's merge count goes up.
* **eviction**: when no slot is free, the least recently used episode goes (used = stored, merged into or recalled,
  on one logical clock; ties go to the lowest slot).

Storage is fixed-capacity persistent buffers (the values in float32, which holds a float32, bfloat16 or float16 state
exactly) plus JSON metadata (per-episode user metadata, in the safetensors header). `save_pretrained`,
`from_pretrained` and `push_to_hub` (from `huggingface_hub.PyTorchModelHubMixin`) write and read `config.json` and
`model.safetensors` only; loading is strict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..cache_ctm import CTMCache, ThinkingState
from ..configuration_ctm import CTMConfig
from ..io_ctm import atomic_write, refuse_non_finite


def mean_input_embedding(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, T) token ids -> (B, E) unit keys: the normalised mean input embedding over the real tokens of each row."""
    embeddings = model.get_input_embeddings()(input_ids).float()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(embeddings.device, torch.float32)[..., None]
    counts = mask.sum(1)
    if (counts == 0).any():
        empty = (counts[:, 0] == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} have no real token: an episode key needs at least one")
    return F.normalize((embeddings * mask).sum(1) / counts, dim=-1)


def _real_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    mask = mask.to(device, torch.float32)[..., None]
    if (mask.sum(1) == 0).any():
        empty = (mask.sum(1)[:, 0] == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} have no real token: an episode key needs at least one")
    return mask


def centered_input_embedding(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, T) -> (B, E) unit keys: the mean over the real tokens of each input embedding minus the vocabulary's mean
    embedding. What every embedding shares would otherwise dominate every key (a one-word question's key then has a
    cosine near zero with every conversation); centred, the key of a text is the sum of its words' own directions,
    and a word's key points at the texts that contain it."""
    table = model.get_input_embeddings()
    embeddings = table(input_ids).float() - table.weight.detach().float().mean(0)
    mask = _real_mask(input_ids, attention_mask, embeddings.device)
    return F.normalize((embeddings * mask).sum(1) / mask.sum(1), dim=-1)


def _final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """The model's final-normed hidden states (B, T, D) of the text read alone, from a fresh start (no cache). Tick
    observers are held back meanwhile: a key is not something the model read (plasticity must not count it)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    registry = getattr(decoder, "tick_observers", None)
    held = dict(registry) if registry is not None else {}
    if registry is not None:
        registry.clear()  # in place: every block holds this same dict
    try:
        device = model.get_input_embeddings().weight.device
        mask = None if attention_mask is None else attention_mask.to(device)
        out = decoder(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        if registry is not None:
            registry.update(held)
    return out.last_hidden_state.float()


def last_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) -> (B, D) unit keys: the model's own final hidden state at the last real token of each row (what the
    model made of the whole text, in the space its head reads)."""
    hidden = _final_hidden_states(model, input_ids, attention_mask)
    mask = _real_mask(input_ids, attention_mask, hidden.device)[..., 0]
    last = (mask * torch.arange(mask.shape[1], device=hidden.device)).argmax(1)  # left or right padding alike
    return F.normalize(hidden[torch.arange(hidden.shape[0], device=hidden.device), last], dim=-1)


def mean_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) -> (B, D) unit keys: the mean of the model's own final hidden states over the real tokens, each token's
    state normalised first (so that no position outweighs the others)."""
    hidden = F.normalize(_final_hidden_states(model, input_ids, attention_mask), dim=-1)
    mask = _real_mask(input_ids, attention_mask, hidden.device)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _token_codes(ids: torch.Tensor, size: int) -> torch.Tensor:
    """(...,) token ids -> (..., size) fixed pseudo-random +-1/sqrt(size) codes, one per id (a hash of the id and the
    dimension: the same in every process and for every vocabulary size, no table held)."""
    x = ids.to(torch.int64)[..., None] * 0x9E3779B1 + torch.arange(size, device=ids.device) * 0x85EBCA77 + 0x165667B1
    for shift, factor in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 0x3C6EF372)):  # integer mixing; int64 wraps
        x = (x ^ (x >> shift)) * factor
    sign = ((x >> 17) & 1).to(torch.float32) * 2 - 1
    return sign / size**0.5


def token_set(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, size: int | None = None
) -> torch.Tensor:
    """(B, T) -> (B, D) unit keys: the normalised sum of a fixed random code (`_token_codes`, D = `size`, by default
    the hidden size; the memory passes its `key_size`) of every distinct token id of the text. Lexical, like a hashed bag of words: a word's key has a cosine of about
    1/sqrt(distinct words) with every text that contains it and about +-1/sqrt(D) with the others, whatever the
    embeddings learned (names the training language never told apart stay apart)."""
    size = model.config.hidden_size if size is None else size
    mask = _real_mask(input_ids, attention_mask, input_ids.device)[..., 0].bool()
    keys = []
    for row, real in zip(input_ids, mask):
        distinct = torch.unique(row[real])
        keys.append(_token_codes(distinct, size).sum(0))
    return F.normalize(torch.stack(keys), dim=-1)


KEY_FUNCTIONS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "mean_input_embedding": mean_input_embedding,
    "centered_input_embedding": centered_input_embedding,
    "last_hidden_state": last_hidden_state,
    "mean_hidden_state": mean_hidden_state,
    "token_set": token_set,
}
# key functions whose key size is free (not the embedding width): the memory's key_size is passed to them
SIZED_KEY_FUNCTIONS = ("token_set",)
EVICTION_CHOICES = ("least_recently_used",)
MERGE_CHOICES = ("replace",)
STATE_FIELDS = ("state", "trace", "alpha_out", "beta_out", "alpha_action", "beta_action")
METADATA_KEY = "episode_metadata"


class _LayerSlots(nn.Module):
    """One thinking layer's share of every slot: the six thinking-state tensors with a leading capacity dim."""

    def __init__(self, capacity: int, hidden_size: int, memory_length: int, n_synch_out: int, n_synch_action: int):
        super().__init__()
        shapes = {
            "state": (hidden_size,),
            "trace": (hidden_size, memory_length),
            "alpha_out": (n_synch_out,),
            "beta_out": (n_synch_out,),
            "alpha_action": (n_synch_action,),
            "beta_action": (n_synch_action,),
        }
        for name in STATE_FIELDS:
            self.register_buffer(name, torch.zeros(capacity, *shapes[name]), persistent=True)


class CTMEpisodicMemory(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="modeling-ctm",
    tags=["ctm", "episodic-memory", "thinking-state"],
):
    """A bounded store of thinking-state snapshots for one model shape; see the module docstring for the rules.

    Build it for a model with `CTMEpisodicMemory.for_model(model.config, capacity=...)`. The constructor arguments
    are the model shape the memory belongs to; they are what `config.json` holds.
    """

    def __init__(
        self,
        capacity: int,
        ctm_layer_indices: list[int],
        hidden_size: int,
        memory_length: int,
        n_synch_out: int,
        n_synch_action: int,
        key_size: int,
        key_function: str = "mean_input_embedding",
        merge_threshold: float = 0.95,
        merge_rule: str = "replace",
        eviction: str = "least_recently_used",
    ):
        super().__init__()

        def positive_int(name, value):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CTMEpisodicMemory {name}={value!r} is invalid: allowed values are integers >= 1")

        for name, value in (
            ("capacity", capacity),
            ("hidden_size", hidden_size),
            ("memory_length", memory_length),
            ("n_synch_out", n_synch_out),
            ("n_synch_action", n_synch_action),
            ("key_size", key_size),
        ):
            positive_int(name, value)
        if (
            not isinstance(ctm_layer_indices, (list, tuple))
            or not ctm_layer_indices
            or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ctm_layer_indices)
        ):
            raise ValueError(
                f"CTMEpisodicMemory ctm_layer_indices={ctm_layer_indices!r} is invalid: allowed values are non-empty "
                "lists of layer indices >= 0 (a model with ctm_layers='none' has no thinking state to store)"
            )
        if key_function not in KEY_FUNCTIONS:
            raise ValueError(f"key_function={key_function!r} is invalid: allowed values are {sorted(KEY_FUNCTIONS)}")
        if key_size != hidden_size and key_function not in SIZED_KEY_FUNCTIONS:
            raise ValueError(
                f"CTMEpisodicMemory key_size={key_size!r} is invalid for key_function={key_function!r}: it must be the "
                f"hidden size {hidden_size} (only {list(SIZED_KEY_FUNCTIONS)} take another key size)"
            )
        if not isinstance(merge_threshold, (int, float)) or isinstance(merge_threshold, bool):
            raise ValueError(f"merge_threshold={merge_threshold!r} is invalid: allowed values are numbers in [-1, 1]")
        if not -1.0 <= merge_threshold <= 1.0 and merge_threshold != float("inf"):
            raise ValueError(
                f"merge_threshold={merge_threshold!r} is invalid: allowed values are numbers in [-1, 1] "
                "(or inf: never merge)"
            )
        if merge_rule not in MERGE_CHOICES:
            raise ValueError(f"merge_rule={merge_rule!r} is invalid: allowed values are {MERGE_CHOICES}")
        if eviction not in EVICTION_CHOICES:
            raise ValueError(f"eviction={eviction!r} is invalid: allowed values are {EVICTION_CHOICES}")

        self.capacity = capacity
        self.ctm_layer_indices = sorted(int(i) for i in ctm_layer_indices)
        self.hidden_size = hidden_size
        self.memory_length = memory_length
        self.n_synch_out = n_synch_out
        self.n_synch_action = n_synch_action
        self.key_size = key_size
        self.key_function = key_function
        self.merge_threshold = float(merge_threshold)
        self.merge_rule = merge_rule
        self.eviction = eviction

        self.register_buffer("keys", torch.zeros(capacity, key_size), persistent=True)
        self.register_buffer("occupied", torch.zeros(capacity, dtype=torch.bool), persistent=True)
        self.register_buffer("last_used", torch.zeros(capacity, dtype=torch.int64), persistent=True)
        self.register_buffer("stored_at", torch.zeros(capacity, dtype=torch.int64), persistent=True)
        self.register_buffer("merges", torch.zeros(capacity, dtype=torch.int64), persistent=True)
        self.register_buffer("clock", torch.zeros((), dtype=torch.int64), persistent=True)
        # buffer names cannot hold dots: a ModuleDict makes the state-dict names `layers.{i}.{field}`, the names of
        # `thinking_state_dict()` with a leading capacity dim
        self.layers = nn.ModuleDict(
            {
                str(i): _LayerSlots(capacity, hidden_size, memory_length, n_synch_out, n_synch_action)
                for i in self.ctm_layer_indices
            }
        )
        self.episode_metadata: dict[int, dict[str, Any]] = {}

    # -- construction --------------------------------------------------------------------------------------------------

    @classmethod
    def for_model(cls, config: CTMConfig, capacity: int, key_size: int | None = None, **options) -> "CTMEpisodicMemory":
        """An empty memory for models of `config`'s shape. `options`: key_function, merge_threshold, merge_rule,
        eviction. `key_size`: the hidden size by default; another one only for the key functions of
        `SIZED_KEY_FUNCTIONS` ("token_set": more dimensions, less crosstalk between texts)."""
        if not config.ctm_layer_indices:
            raise ValueError("CTMConfig.ctm_layers='none': this model has no thinking state to store")
        return cls(
            capacity=capacity,
            ctm_layer_indices=list(config.ctm_layer_indices),
            hidden_size=config.hidden_size,
            memory_length=config.ctm_memory_length,
            n_synch_out=config.ctm_n_synch_out,
            n_synch_action=config.ctm_n_synch_action,
            key_size=config.hidden_size if key_size is None else key_size,
            **options,
        )

    @property
    def shape_fields(self) -> dict[str, Any]:
        """The model fields this memory belongs to, named as in `CTMConfig`."""
        return {
            "ctm_layer_indices": self.ctm_layer_indices,
            "hidden_size": self.hidden_size,
            "ctm_memory_length": self.memory_length,
            "ctm_n_synch_out": self.n_synch_out,
            "ctm_n_synch_action": self.n_synch_action,
        }

    def check_model(self, config: CTMConfig) -> None:
        """Raise `ValueError` naming every field where `config` differs from the shape this memory was built for."""
        mismatches = []
        for name, mine in self.shape_fields.items():
            theirs = list(config.ctm_layer_indices) if name == "ctm_layer_indices" else getattr(config, name)
            if theirs != mine:
                mismatches.append(f"{name}: memory {mine!r}, model {theirs!r}")
        if self.key_size != config.hidden_size and self.key_function not in SIZED_KEY_FUNCTIONS:
            mismatches.append(f"key_size: memory {self.key_size}, model embeddings {config.hidden_size}")
        if mismatches:
            raise ValueError("this episodic memory belongs to a model of another shape: " + "; ".join(mismatches))

    def __len__(self) -> int:
        return int(self.occupied.sum())

    @property
    def bytes_per_episode(self) -> int:
        """Bytes one slot holds in buffers (key, thinking state, bookkeeping); the JSON metadata comes on top."""
        slots = (buffer for name, buffer in self.named_buffers() if name != "clock")
        return sum(buffer[0].numel() * buffer.element_size() for buffer in slots)

    def extra_repr(self) -> str:
        return (
            f"episodes={len(self)}/{self.capacity}, layers={self.ctm_layer_indices}, key={self.key_function}, "
            f"merge>={self.merge_threshold} ({self.merge_rule}), eviction={self.eviction}"
        )

    # -- keys ----------------------------------------------------------------------------------------------------------

    def key_of(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, key_size) unit keys of the rows of `input_ids`, as this memory files and searches them (a retriever
        outside the memory, such as a RAG baseline, can rank texts by the same key)."""
        return self._keys(model, input_ids, attention_mask)

    def _keys(self, model, input_ids, attention_mask) -> torch.Tensor:
        self.check_model(model.config)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be a (batch, length) or (length,) tensor, got {type(input_ids)}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None else None
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        with torch.no_grad():
            if self.key_function in SIZED_KEY_FUNCTIONS:
                keys = KEY_FUNCTIONS[self.key_function](model, input_ids, attention_mask, size=self.key_size)
            else:
                keys = KEY_FUNCTIONS[self.key_function](model, input_ids, attention_mask)
        return keys.to(self.keys.device, torch.float32)

    def search(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity of each row's key to its best stored episode, and that episode's slot: two (B,)
        tensors. Empty memory: scores -inf, slots -1. Changes nothing (recency moves only on `recall`)."""
        queries = self._keys(model, input_ids, attention_mask)
        scores = queries @ self.keys.T  # (B, capacity): one product over every slot
        scores = scores.masked_fill(~self.occupied, float("-inf"))
        best, slots = scores.max(dim=1)
        return best, torch.where(torch.isfinite(best), slots, torch.full_like(slots, -1))

    # -- store, recall, forget -----------------------------------------------------------------------------------------

    def _tick(self) -> torch.Tensor:
        self.clock += 1
        return self.clock.clone()

    @staticmethod
    def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
        """The name of the first floating tensor holding a NaN or inf, or None."""
        return next((n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)

    def is_storable(self, cache: CTMCache) -> bool:
        """Whether `cache`'s thinking state is finite (`store` refuses one that is not)."""
        return self._non_finite(cache.thinking_state_dict()) is None

    @torch.no_grad()
    def store(
        self,
        model,
        input_ids: torch.Tensor,
        cache: CTMCache,
        attention_mask: torch.Tensor | None = None,
        metadata: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Store one episode per row: the key of `input_ids` (real tokens only) and the final thinking state of that
        row in `cache` (the cache `model(input_ids, use_cache=True)` returned). `metadata`: one JSON-serialisable dict
        for all rows, or one per row. Returns the (B,) slots written (merge and eviction rules: module docstring)."""
        if not isinstance(cache, CTMCache):
            raise TypeError(f"cache must be a CTMCache (a forward's `cache` with use_cache=True), got {type(cache)}")
        keys = self._keys(model, input_ids, attention_mask)
        rows = keys.shape[0]
        tensors = cache.thinking_state_dict()
        expected = {f"layers.{i}.{name}" for i in self.ctm_layer_indices for name in STATE_FIELDS}
        if set(tensors) != expected:
            raise ValueError(
                f"the cache's thinking state has tensors {sorted(set(tensors) ^ expected)} where this memory "
                f"expects exactly {sorted(expected)}"
            )
        overflowed = self._non_finite(tensors)
        if overflowed is not None:  # a recalled non-finite state would poison every conversation it seeds
            raise ValueError(
                f"cache tensor {overflowed} holds non-finite values: a thinking state that overflowed is not stored "
                "(CTMEpisodicMemory.is_storable(cache) checks first)"
            )
        for name, tensor in tensors.items():
            slot_shape = tuple(self.get_buffer(name).shape[1:])
            if tuple(tensor.shape) != (rows, *slot_shape):
                raise ValueError(
                    f"cache tensor {name} has shape {tuple(tensor.shape)}; this memory needs ({rows}, *{slot_shape}) "
                    f"for {rows} rows of input_ids"
                )
        if metadata is None or isinstance(metadata, dict):
            metadata = [metadata] * rows
        if len(metadata) != rows:
            raise ValueError(f"metadata has {len(metadata)} entries for {rows} rows")
        for entry in metadata:
            if entry is not None:
                json.dumps(entry)  # raises TypeError naming the non-serialisable value now, not at save time

        slots = []
        for row in range(rows):  # rows in order: a later row may merge with an earlier one of the same batch
            key = keys[row]
            scores = (self.keys @ key).masked_fill(~self.occupied, float("-inf"))
            best = int(scores.argmax())
            if self.occupied.any() and float(scores[best]) >= self.merge_threshold:
                slot, merged = best, True
            elif not bool(self.occupied.all()):
                slot, merged = int((~self.occupied).int().argmax()), False
            else:  # least recently used; argmin returns the first (lowest) slot among ties
                slot, merged = int(self.last_used.argmin()), False
            now = self._tick()
            self.keys[slot] = key
            for name, tensor in tensors.items():
                self.get_buffer(name)[slot] = tensor[row].to(self.keys.device, torch.float32)
            self.merges[slot] = self.merges[slot] + 1 if merged else 0
            self.stored_at[slot] = now
            self.last_used[slot] = now
            self.occupied[slot] = True
            if metadata[row] is not None:
                self.episode_metadata[slot] = dict(metadata[row])
            else:
                self.episode_metadata.pop(slot, None)
            slots.append(slot)
        return torch.tensor(slots, dtype=torch.long)

    def episode(self, slots: int | Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored thinking state of `slots` in the `thinking_state_dict()` format (batch = number of slots)."""
        index = torch.as_tensor([slots] if isinstance(slots, int) else slots, dtype=torch.long).flatten()
        empty = [int(s) for s in index if not 0 <= int(s) < self.capacity or not bool(self.occupied[int(s)])]
        if empty:
            raise ValueError(f"slots {empty} hold no episode (capacity {self.capacity}, {len(self)} stored)")
        return {
            f"layers.{i}.{name}": self.get_buffer(f"layers.{i}.{name}")[index]
            for i in self.ctm_layer_indices
            for name in STATE_FIELDS
        }

    @torch.no_grad()
    def recall(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        threshold: float = 0.3,
        mark_used: bool = True,
    ) -> CTMCache | None:
        """A fresh `CTMCache` (no KV) whose rows start from the best-matching stored thinking state, or `None` when
        no row reaches `threshold` (cosine). Rows below the threshold start from the learned start state, as in a
        fresh cache. The recalled episodes count as used (least-recently-used eviction) unless `mark_used=False`
        (a probe that must leave the memory exactly as it was)."""
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold!r} is invalid: allowed values are numbers in [-1, 1]")
        scores, slots = self.search(model, input_ids, attention_mask)
        hit = scores >= threshold
        if not bool(hit.any()):
            return None
        if mark_used:
            self.last_used[slots[hit]] = self._tick()
        dtype = model.get_input_embeddings().weight.dtype
        device = model.get_input_embeddings().weight.device
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        hit_on_model = hit.to(device)
        tensors = {}
        stored = self.episode(torch.where(hit, slots, slots[hit][0]))  # rows that miss are replaced just below
        for i in self.ctm_layer_indices:
            start = decoder.layers[i].thinking.start(dtype)  # batch dims (1,)
            recalled = ThinkingState.from_dict(stored, f"layers.{i}.")
            for name in STATE_FIELDS:
                value = getattr(recalled, name).to(device)
                fresh = getattr(start, name)
                value = value.to(fresh.dtype)  # state/trace back to the compute dtype; accumulators stay float32
                mask = hit_on_model.view(-1, *([1] * (value.dim() - 1)))
                tensors[f"layers.{i}.{name}"] = torch.where(mask, value, fresh.expand_as(value)).contiguous()
        return CTMCache.from_thinking_state(model.config, tensors)

    @torch.no_grad()
    def forget(self, slots: int | Sequence[int] | torch.Tensor) -> int:
        """Erase the episodes in `slots` (key, value, bookkeeping and metadata zeroed: the state is gone, not hidden).
        Find slots by content with `search`. Returns how many episodes were erased."""
        index = torch.as_tensor([slots] if isinstance(slots, int) else slots, dtype=torch.long).flatten()
        bad = [int(s) for s in index if not 0 <= int(s) < self.capacity]
        if bad:
            raise ValueError(f"slots {bad} are out of range: allowed values are 0..{self.capacity - 1}")
        erased = int(self.occupied[index].sum())
        for name, buffer in self.named_buffers():
            if name != "clock":
                buffer[index] = 0
        for slot in index.tolist():
            self.episode_metadata.pop(slot, None)
        return erased

    def clear(self) -> None:
        """Forget every episode."""
        self.forget(torch.arange(self.capacity))

    # -- persistence ---------------------------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "ctm_layer_indices": self.ctm_layer_indices,
            "hidden_size": self.hidden_size,
            "memory_length": self.memory_length,
            "n_synch_out": self.n_synch_out,
            "n_synch_action": self.n_synch_action,
            "key_size": self.key_size,
            "key_function": self.key_function,
            "merge_threshold": self.merge_threshold,
            "merge_rule": self.merge_rule,
            "eviction": self.eviction,
        }

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs,
    ) -> str | None:
        """Write `config.json` and `model.safetensors` (nothing else), each atomically; optionally push them.
        `config` is accepted for the mixin's `push_to_hub` and must equal this memory's own config."""
        if config is not None and config != self.config:
            raise ValueError("config must be this memory's own config (it describes the buffers' shapes)")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        header = {METADATA_KEY: json.dumps({str(k): v for k, v in sorted(self.episode_metadata.items())})}
        atomic_write(save_directory / constants.SAFETENSORS_SINGLE_FILE, lambda p: save_file(tensors, p, header))
        text = json.dumps(self.config, sort_keys=True, indent=2)
        atomic_write(save_directory / constants.CONFIG_NAME, lambda p: Path(p).write_text(text))
        if push_to_hub:
            return self.push_to_hub(repo_id or save_directory.name, **push_to_hub_kwargs)
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, model_config: CTMConfig | None = None, **kwargs):
        """Load a saved memory (a folder or a Hub repo) strictly. With `model_config`, also check that the memory
        belongs to that model shape (`ValueError` naming every mismatching field)."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            config_file = path / constants.CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file} is missing: a saved episodic memory has config.json")
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{config_file} is not valid JSON: {error}") from error
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
            missing = sorted({"capacity", "ctm_layer_indices", "hidden_size", "key_size"} - set(config))
            if missing:
                raise ValueError(f"{config_file} lacks the fields {missing}")
        memory = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if model_config is not None:
            memory.check_model(model_config)
        return memory

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision,
        cache_dir,
        force_download: bool,
        local_files_only: bool,
        token,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ):
        if not strict:
            raise ValueError("strict=False is refused: a missing tensor would be a silently empty memory")
        memory = cls(**model_kwargs)
        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
            if not os.path.isfile(model_file):
                raise FileNotFoundError(f"{model_file} is missing: a saved episodic memory has model.safetensors")
        else:
            model_file = hf_hub_download(
                repo_id=model_id,
                filename=constants.SAFETENSORS_SINGLE_FILE,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        memory._load_file(model_file, map_location)
        return memory.eval()

    def _load_file(self, model_file: str, map_location: str = "cpu") -> None:
        try:
            with safe_open(model_file, framework="pt", device=str(map_location)) as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{model_file} is not a readable safetensors file: {error}") from error
        expected = self.state_dict()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"{model_file} does not match config.json: missing tensors {missing}, extra {extra}")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
                raise ValueError(
                    f"{model_file}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, config.json implies "
                    f"{expected[name].dtype} {tuple(expected[name].shape)}"
                )
        refuse_non_finite(tensors, model_file)  # an inf state would give non-finite logits on every recall
        try:
            metadata = json.loads(header.get(METADATA_KEY, "{}"))
            if not isinstance(metadata, dict):
                raise ValueError(f"expected a JSON object, got {type(metadata).__name__}")
            metadata = {int(slot): entry for slot, entry in metadata.items()}
        except ValueError as error:
            raise ValueError(f"{model_file}: the {METADATA_KEY} header is corrupted: {error}") from error
        self.load_state_dict(tensors, strict=True)
        self.episode_metadata = metadata


__all__ = [
    "CTMEpisodicMemory",
    "KEY_FUNCTIONS",
    "centered_input_embedding",
    "last_hidden_state",
    "mean_hidden_state",
    "mean_input_embedding",
    "token_set",
]
