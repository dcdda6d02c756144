# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The confidence head: the model's own estimate that the token it serves is right, read from what the forward pass
already computed (the readout's probabilities, the certainty of every tick, and how far each tick moved S_out).

A linear map of those features and a sigmoid. It is fitted afterwards on frozen features with a Brier loss
(`modeling_ctm.training.confidence.fit_confidence_head`), saved with the model (`CTMConfig.ctm_confidence_head`), and
read through `generate(..., output_confidence=True)` or `token_confidence(model, input_ids)`. A fresh head (weights
zero) says 0.5 everywhere.

Travels with checkpoints as remote code (imported by `modeling_ctm.py`)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache_ctm import read_synchronisation
from .configuration_ctm import CTM_CONFIDENCE_HEAD_CHOICES
from .observers_ctm import CTMOutputEvent, CTMTickEvent, CTMTickObserver


CONFIDENCE_HEAD_CHOICES = CTM_CONFIDENCE_HEAD_CHOICES
LOGIT_FEATURES = ("maxprob", "margin", "one_minus_entropy")


def confidence_feature_names(config) -> list[str]:
    """The head's inputs, in order: the readout's max-probability, top-1 minus top-2 probability and 1 - normalised
    entropy; when the last layer thinks, the certainty of every tick; per thinking layer and tick, log(1 + the
    change of S_out that tick made) (tick 0 against the state the token entered with)."""
    names = list(LOGIT_FEATURES)
    layers = list(config.ctm_layer_indices)
    if layers and layers[-1] == config.num_hidden_layers - 1:
        names += [f"certainty_tick{k}" for k in range(config.ctm_ticks)]
    names += [f"sync_change_layer{i}_tick{k}" for i in layers for k in range(config.ctm_ticks)]
    return names


def confidence_features(
    logits: torch.Tensor, certainty: torch.Tensor | None = None, sync_change: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., V) logits, (..., K) tick certainty or None, (..., L, K) S_out change or None -> (..., F) float32."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    top = log_probs.topk(min(2, log_probs.shape[-1]), dim=-1).values.exp()
    second = top[..., 1] if top.shape[-1] > 1 else torch.zeros_like(top[..., 0])
    entropy = -(log_probs.exp() * log_probs).sum(-1) / math.log(max(log_probs.shape[-1], 2))
    parts = [top[..., :1], (top[..., 0] - second)[..., None], (1 - entropy)[..., None]]
    if certainty is not None:
        parts.append(certainty.float())
    if sync_change is not None:
        # a halted token's skipped ticks moved nothing
        parts.append(torch.log1p(torch.nan_to_num(sync_change.float(), nan=0.0)).flatten(-2))
    return torch.cat(parts, dim=-1)


class CTMConfidenceHead(nn.Module):
    """P(the served token is right) = sigmoid(w . features + b), features as `confidence_feature_names(config)`."""

    def __init__(self, config):
        super().__init__()
        self.feature_names = confidence_feature_names(config)
        # own parameters, not an nn.Linear child: `_init_weights` must not give it the default Linear init
        self.weight = nn.Parameter(torch.zeros(len(self.feature_names)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(features.to(self.weight.dtype) @ self.weight + self.bias).float()


class CTMConfidenceRecorder(CTMTickObserver):
    """Gathers the head's features for every position of each forward call and, with a head, its confidence.

    `last_only`: keep only the last position of each call (what a generation step's logits choose the next token
    from), one entry per call; otherwise keep every position of every call. `features` and `confidence` are lists of
    (B, T or 1, F) and (B, T or 1) tensors, one per call."""

    def __init__(self, config, head: CTMConfidenceHead | None = None, last_only: bool = False):
        self.layer_position = {idx: i for i, idx in enumerate(config.ctm_layer_indices)}
        self.ticks = config.ctm_ticks
        self.head = head
        self.last_only = last_only
        self.features: list[torch.Tensor] = []
        self.confidence: list[torch.Tensor] = []
        self._sync: torch.Tensor | None = None

    def on_tick(self, event: CTMTickEvent) -> None:
        rows, slots = event.valid.nonzero(as_tuple=True)
        columns = event.columns[rows, slots]
        before = read_synchronisation(event.before.alpha_out[rows, slots], event.before.beta_out[rows, slots])
        after = read_synchronisation(event.after.alpha_out[rows, slots], event.after.beta_out[rows, slots])
        if self._sync is None:
            B, T = event.valid.shape[0], event.sequence_length
            self._sync = before.new_zeros(B, T, len(self.layer_position), self.ticks)
        self._sync[rows, columns, self.layer_position[event.layer_idx], event.tick] = (after - before).norm(dim=-1)

    def on_output(self, event: CTMOutputEvent) -> None:
        kept = event.logits.shape[1]  # generate keeps the logits of the last position only
        sync = self._sync[:, -kept:] if self._sync is not None else None
        features = confidence_features(event.logits.detach(), event.certainty, sync)
        if self.last_only:
            features = features[:, -1:]
        self.features.append(features)
        if self.head is not None:
            with torch.no_grad():
                self.confidence.append(self.head(features))
        self._sync = None

    def aligned(self, beam_indices: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The generation steps stacked: {"confidence": (rows, steps)}; with `beam_indices` each final sequence's
        value at step i is read from the beam row that produced its token i (NaN past its end)."""
        values = torch.cat(self.confidence, dim=1)
        if beam_indices is None:
            return {"confidence": values}
        beam_indices = beam_indices.to(values.device).long()
        steps = torch.arange(beam_indices.shape[1], device=beam_indices.device)
        picked = values[beam_indices.clamp(min=0), steps[None, :]]
        return {"confidence": picked.masked_fill(beam_indices < 0, float("nan"))}


def add_confidence_head(model) -> CTMConfidenceHead:
    """Give a `CTMForCausalLM` a fresh confidence head in place (config field set, weights zero: 0.5 everywhere);
    a model that has one keeps it. The head is left out of the optimiser: it is fitted on frozen features."""
    if getattr(model, "confidence_head", None) is None:
        reference = model.lm_head.weight
        head = CTMConfidenceHead(model.config).to(device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        head.requires_grad_(False)
        model.confidence_head = head
        model.config.ctm_confidence_head = "linear"
    return model.confidence_head


@torch.no_grad()
def token_confidence(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """One full forward: (confidence (B, T) of the token each position serves, features (B, T, F)). Without a head
    the confidence is None (the features are what a head is fitted on)."""
    recorder = CTMConfidenceRecorder(model.config, getattr(model, "confidence_head", None))
    with model.observing(recorder):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    confidence = recorder.confidence[0] if recorder.confidence else None
    return confidence, recorder.features[0]


def mark_unsure(text: str, confidence: float, threshold: float, marker: str = " (unsure)") -> str:
    """The metacognitive marker, a rule applied at generation time: `text` followed by `marker` when the head's
    confidence in the answer is below `threshold`, else `text` unchanged. The model is not trained to write it."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return text + marker if confidence < threshold else text


def mark_words(pieces: list[str], confidence: list[float], threshold: float) -> str:
    """The decoded `pieces` of a reply (one per token) joined, each word holding a token whose confidence is below
    `threshold` written as `[word?]`. A piece that starts with whitespace starts a new word."""
    if len(pieces) != len(confidence):
        raise ValueError(f"pieces ({len(pieces)}) and confidence ({len(confidence)}) must be equally long")
    words: list[tuple[str, bool]] = []
    for piece, value in zip(pieces, confidence):
        unsure = value < threshold
        if not words or piece[:1].isspace():
            words.append((piece, unsure))
        else:
            text, flagged = words[-1]
            words[-1] = (text + piece, flagged or unsure)
    out = []
    for text, flagged in words:
        stripped = text.lstrip()
        out.append(f"{text[: len(text) - len(stripped)]}[{stripped}?]" if flagged and stripped else text)
    return "".join(out)


__all__ = [
    "CONFIDENCE_HEAD_CHOICES",
    "CTMConfidenceHead",
    "CTMConfidenceRecorder",
    "add_confidence_head",
    "confidence_feature_names",
    "confidence_features",
    "mark_unsure",
    "mark_words",
    "token_confidence",
]
