# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The dream: what the ticks did on the dreamt sequences (per layer and tick: state change, certainty,
synchronisation change), seen through the tick observer."""

from __future__ import annotations

import torch

from ...cache_ctm import read_synchronisation
from ...observers_ctm import CTMTickObserver, summarize_probe


class _EntrySync(CTMTickObserver):
    """Records, per thinking layer, the readout synchronisation each token entered tick 0 with (for sync_change)."""

    def __init__(self):
        self.entry: dict[int, torch.Tensor] = {}

    def on_tick(self, event) -> None:
        if event.tick != 0:
            return
        rows, slots = event.valid.nonzero(as_tuple=True)
        columns = event.columns[rows, slots]
        sync = read_synchronisation(event.before.alpha_out, event.before.beta_out)
        if event.layer_idx not in self.entry:
            self.entry[event.layer_idx] = sync.new_zeros(event.valid.shape[0], event.sequence_length, sync.shape[-1])
        self.entry[event.layer_idx][rows, columns] = sync[rows, slots].detach().float()


@torch.no_grad()
def dream(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """The dream diagnostics of one forward pass: `summarize_probe` (observers_ctm) of `model.probe` (per layer and tick: mean
    state change, logit-lens certainty and readout-synchronisation change over the real tokens). Empty for a model
    without thinking layers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    with model.observing(_EntrySync()) as entry:
        _, layers = model.probe(input_ids, attention_mask=attention_mask)
    model.train(was_training)
    if not layers:
        return {}
    for layer_idx, probe in layers.items():
        probe.sync_entry = entry.entry.get(layer_idx)
    return summarize_probe(layers, token_mask=attention_mask)

