# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The statistics observer: what the rule reads during the ticks (the readout synchronisation, the synapse's input and
output, the residual stream and the kept MLP's hidden activation), handed to the rule when the head has finished."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...observers_ctm import CTMLayerEvent, CTMOutputEvent, CTMTickEvent, CTMTickObserver


@dataclass
class _Target:
    """One edited matrix: its parameter name, the parameter, the kind of rule, and its thinking layer."""

    name: str
    param: torch.nn.Parameter
    kind: str  # "out_proj", "synapse" or "mlp"
    layer_idx: int


class HebbianPlasticityObserver(CTMTickObserver):
    """Gathers the per-token activity of the target layers during the ticks and turns it, at `on_output`, into the
    gated sums the rule needs. Owned by `HebbianPlasticity`; registered only while plasticity is enabled."""

    def __init__(self, rule):  # the HebbianPlasticity that owns it (its `_accumulate` turns the buffers into sums)
        self.rule = rule
        self.pending_synapse_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.sync: dict[int, torch.Tensor] = {}  # (B, T, K, S) per out_proj layer
        self.synapse_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, T, K, in), (B, T, K, D)
        self.residual: dict[int, torch.Tensor] = {}
        self.output: dict[int, torch.Tensor] = {}
        self.mlp_input: dict[int, torch.Tensor] = {}  # (B, T, I): the kept MLP's hidden activation (its key)
        self.pending_synapse_io.clear()

    # the synapse's hidden input and linear output are not part of the tick event: a forward hook on that one layer
    # hands them over (the tick's `on_tick` follows its synapse call immediately)
    def synapse_hook(self, layer_idx: int):
        def hook(module, inputs, output):
            self.pending_synapse_io[layer_idx] = (inputs[0].detach(), output.detach())

        return hook

    def mlp_hook(self, layer_idx: int):
        def hook(module, inputs, output):
            self.mlp_input[layer_idx] = inputs[0].detach()

        return hook

    def on_tick(self, event: CTMTickEvent) -> None:
        layer = event.layer_idx
        rule = self.rule
        if layer not in rule.layer_indices:
            return
        rows, slots = event.valid.nonzero(as_tuple=True)
        columns = event.columns[rows, slots]
        B, T, K = event.valid.shape[0], event.sequence_length, event.ticks
        if rule.edits_out_proj:
            sync = event.sync_out.detach()
            buffer = self.sync.get(layer)
            if buffer is None:
                buffer = self.sync[layer] = sync.new_zeros(B, T, K, sync.shape[-1])
            buffer[rows, columns, event.tick] = sync[rows, slots]
        if rule.edits_synapse:
            pending = self.pending_synapse_io.pop(layer, None)
            if pending is None or pending[0].shape[:2] != event.valid.shape:
                return
            x, y = pending[0].float(), pending[1].float()
            io = self.synapse_io.get(layer)
            if io is None:
                io = self.synapse_io[layer] = (x.new_zeros(B, T, K, x.shape[-1]), y.new_zeros(B, T, K, y.shape[-1]))
            io[0][rows, columns, event.tick] = x[rows, slots]
            io[1][rows, columns, event.tick] = y[rows, slots]

    def on_layer(self, event: CTMLayerEvent) -> None:
        if event.layer_idx in self.rule.layer_indices:
            self.residual[event.layer_idx] = event.residual.detach()
            self.output[event.layer_idx] = event.output.detach()

    def on_output(self, event: CTMOutputEvent) -> None:
        try:
            self.rule._accumulate(event, self)
        finally:
            self.reset_buffers()
