# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The tick observer: how anything outside the block sees (and may steer) the ticks, the events it is told, and the
two observers the model itself uses (`probe()` and `generate(..., output_certainty=True)`).

Travels with checkpoints as remote code (imported by `modeling_ctm.py`). It never imports the model: an event carries
values and callables, not the block, so anything that observes depends on this file alone."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy
import torch

from .cache_ctm import ThinkingState, read_synchronisation, sync_convergence


class CTMTickObserver:
    """The one way in to what happens inside the ticks. Subclass, override what you need, and register with
    `model.add_tick_observer(observer)` (a handle with `.remove()`, usable as a context manager) or
    `with model.observing(observer): ...`. Probes, plasticity statistics, sleep's dream diagnostics and certainty
    through `generate` are all observers; with none registered the forward pays nothing.

    Per thinking layer and tick, the block first asks every observer `intervene(event)` (return a tensor to replace
    the post-activation state z; the synchronisation of that tick is then recomputed from it), then tells every
    observer `on_tick(event)` with the final state. After each thinking layer comes `on_layer`, after the head
    `on_output`.
    """

    def intervene(self, event: "CTMTickEvent") -> torch.Tensor | None:
        return None

    def on_tick(self, event: "CTMTickEvent") -> None:
        pass

    def on_layer(self, event: "CTMLayerEvent") -> None:
        pass

    def on_output(self, event: "CTMOutputEvent") -> None:
        pass


@dataclass
class CTMTickEvent:
    """One tick of one CTM layer over the tokens of one thinking step. Tensors are (B, n, ...): slot j of row b holds
    sequence position `columns[b, j]` of the current call, a real token where `valid[b, j]` (padding slots run too,
    their results are dropped). Derived views are computed only when an observer asks for them.

    What an observer may need of the block travels as values (`ticks`) and as the block's own functions
    (`readout`, `decay_rates`), so the event never holds the block and this file never imports the model."""

    layer_idx: int
    tick: int
    before: ThinkingState  # the state entering this tick
    after: ThinkingState  # the state this tick produced
    columns: torch.Tensor  # (B, n) long
    valid: torch.Tensor  # (B, n) bool
    sequence_length: int  # T of the current call
    ticks: int  # K, the ticks of this layer per step
    readout: Callable[[ThinkingState], torch.Tensor]  # y = out_proj(S_out) of a state (B, n, D)
    decay_rates: Callable[[], torch.Tensor]  # the readout synchronisation's decay rates r (S_out,), float32
    halted: torch.Tensor | None = None  # (B, n) bool: tokens that had stopped thinking, so this tick left them as is

    @property
    def state_delta(self) -> torch.Tensor:
        """||z_k - z_{k-1}|| per token (B, n), with z_{-1} the state the token entered with."""
        return (self.after.state - self.before.state).float().norm(dim=-1)

    @property
    def sync_out(self) -> torch.Tensor:
        """The readout synchronisation S_out after this tick (B, n, S_out), float32."""
        return read_synchronisation(self.after.alpha_out, self.after.beta_out)

    @property
    def sync_action(self) -> torch.Tensor:
        """The action synchronisation S_action after this tick (B, n, S_action), float32."""
        return read_synchronisation(self.after.alpha_action, self.after.beta_action)

    @property
    def pre_activation(self) -> torch.Tensor:
        """The newest entry of the trace: what the synapse produced this tick, before the neuron-level models."""
        return self.after.trace[..., -1]

    @property
    def sync_convergence(self) -> torch.Tensor:
        """How settled S_out is after this tick (B, n): 1 - ||S_out,k - S_out,k-1|| / ||S_out,k||, in [0, 1]."""
        return sync_convergence(self.before, self.after)

    def output(self) -> torch.Tensor:
        """y_k = out_proj(S_out): what this tick would add to the residual stream (B, n, D)."""
        return self.readout(self.after)


@dataclass
class CTMLayerEvent:
    """A thinking layer finished the current call: the residual stream entering its block (B, T, D) and what the
    block added to it at the final tick (B, T, D)."""

    layer_idx: int
    residual: torch.Tensor
    output: torch.Tensor


@dataclass
class CTMOutputEvent:
    """The head finished: the readout `logits` (B, T, V), and for a model whose last layer thinks the per-tick
    `certainty` (B, T, K) and `selected_tick` (B, T). `labels` are the unshifted labels when given."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    logits: torch.Tensor
    certainty: torch.Tensor | None = None
    selected_tick: torch.Tensor | None = None


@dataclass
class CTMLayerProbe:
    """What one CTM layer did, per token and tick (the "fMRI"). Shapes (B, T, K, ...)."""

    state: torch.Tensor  # post-activation z_k (B, T, K, D)
    state_delta: torch.Tensor  # ||z_k - z_{k-1}|| with z_{-1} the entry state (B, T, K)
    sync_out: torch.Tensor  # readout synchronisation S_out at tick k (B, T, K, S_out)
    tick_outputs: torch.Tensor  # y_k, what tick k would add to the residual stream (B, T, K, D)
    residual: torch.Tensor | None = None  # the residual stream entering the block (B, T, D)
    certainty: torch.Tensor | None = None  # certainty of the logit lens on residual + y_k (B, T, K)
    entry_sync_out: torch.Tensor | None = None  # S_out of the state each token entered with (B, T, S_out)


class CTMProbeRecorder(CTMTickObserver):
    """The observer behind `probe()`: records every real token's per-tick state, change, readout synchronisation and
    tick output at its sequence position, and may intervene.

    `intervention(layer_idx, tick, state) -> state | None` may replace the post-activation z after tick `tick`.
    """

    def __init__(self, intervention: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None):
        self.intervention = intervention
        self.layers: dict[int, CTMLayerProbe] = {}

    def intervene(self, event: CTMTickEvent) -> torch.Tensor | None:
        if self.intervention is None:
            return None
        return self.intervention(event.layer_idx, event.tick, event.after.state)

    def on_tick(self, event: CTMTickEvent) -> None:
        rows, slots = event.valid.nonzero(as_tuple=True)
        columns = event.columns[rows, slots]
        recorded = {
            "state": event.after.state,
            "state_delta": event.state_delta,
            "sync_out": event.sync_out,
            "tick_outputs": event.output(),
        }
        probe = self.layers.get(event.layer_idx)
        if probe is None:
            B, T, K = event.valid.shape[0], event.sequence_length, event.ticks
            probe = CTMLayerProbe(**{name: t.new_zeros(B, T, K, *t.shape[2:]) for name, t in recorded.items()})
            self.layers[event.layer_idx] = probe
        for name, tensor in recorded.items():
            getattr(probe, name)[rows, columns, event.tick] = tensor[rows, slots].detach()
        if event.tick == 0:  # the entry's S_out, so a picture can show how far tick 0 moved the readout
            entry = read_synchronisation(event.before.alpha_out, event.before.beta_out)
            if probe.entry_sync_out is None:
                probe.entry_sync_out = entry.new_zeros(probe.sync_out.shape[:2] + entry.shape[2:])
            probe.entry_sync_out[rows, columns] = entry[rows, slots].detach()

    def on_layer(self, event: CTMLayerEvent) -> None:
        self.layers[event.layer_idx].residual = event.residual.detach()


class CTMGenerationCertainty(CTMTickObserver):
    """The observer behind `generate(..., output_certainty=True)`. Per forward call (one generation step) it keeps,
    for the last position of every row (the one whose logits pick the next token): the certainty of the readout tick,
    the readout tick, and per thinking layer and tick the sync divergence ||S_out,k - S_out,k-1|| (tick 0 against the
    state the token entered with). Rows are the rows of that step (beams before reordering)."""

    def __init__(self, layer_indices: list[int], ticks: int):
        self.layer_position = {idx: i for i, idx in enumerate(layer_indices)}
        self.ticks = ticks
        self.certainty, self.selected_tick, self.sync_divergence = [], [], []
        self._step_sync: torch.Tensor | None = None

    def on_tick(self, event: CTMTickEvent) -> None:
        last = event.valid & (event.columns == event.sequence_length - 1)
        rows, slots = last.nonzero(as_tuple=True)
        before = read_synchronisation(event.before.alpha_out[rows, slots], event.before.beta_out[rows, slots])
        after = read_synchronisation(event.after.alpha_out[rows, slots], event.after.beta_out[rows, slots])
        if self._step_sync is None:
            B = event.valid.shape[0]
            self._step_sync = before.new_full((B, len(self.layer_position), self.ticks), float("nan"))
        self._step_sync[rows, self.layer_position[event.layer_idx], event.tick] = (after - before).norm(dim=-1)

    def on_output(self, event: CTMOutputEvent) -> None:
        selected = event.selected_tick[:, -1]
        self.certainty.append(event.certainty[:, -1].gather(-1, selected[:, None])[:, 0])
        self.selected_tick.append(selected)
        self.sync_divergence.append(self._step_sync)
        self._step_sync = None

    def aligned(self, beam_indices: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Stack the steps: (rows, steps, ...). With `beam_indices` (rows, steps; -1 past a beam's end) each final
        sequence's value at step i is read from the beam row that produced its token i (NaN / -1 past its end)."""
        values = {
            "certainty": torch.stack(self.certainty, 1),
            "selected_tick": torch.stack(self.selected_tick, 1),
            "sync_divergence": torch.stack(self.sync_divergence, 1),
        }
        if beam_indices is None:
            return values
        beam_indices = beam_indices.to(values["certainty"].device).long()
        steps = torch.arange(beam_indices.shape[1], device=beam_indices.device)
        source = beam_indices.clamp(min=0)
        result = {}
        for name, tensor in values.items():
            picked = tensor[source, steps[None, :]]
            ended = (beam_indices < 0).view(*beam_indices.shape, *([1] * (picked.dim() - 2)))
            result[name] = picked.masked_fill(ended, -1 if name == "selected_tick" else float("nan"))
        return result


class CTMObserverHandle:
    """Returned by `add_tick_observer`: `.remove()` unregisters; also a context manager."""

    _next_id = 0

    def __init__(self, registry: dict):
        self.registry = registry
        self.id = CTMObserverHandle._next_id
        CTMObserverHandle._next_id += 1

    def remove(self) -> None:
        self.registry.pop(self.id, None)

    def __enter__(self) -> "CTMObserverHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# What a probe shows, reduced to means per layer and tick (the numbers behind the fMRI picture and sleep's dream).
METRICS = ("state_delta", "certainty", "sync_change")


def sync_change(probe: CTMLayerProbe) -> torch.Tensor:
    """||S_out,k - S_out,k-1|| per token and tick (B, T, K), tick 0 against the S_out the token entered with (NaN
    for tick 0 when the probe did not record the entry)."""
    sync = probe.sync_out.float()
    steps = (sync[:, :, 1:] - sync[:, :, :-1]).norm(dim=-1)
    if probe.entry_sync_out is None:
        first = torch.full_like(steps[:, :, :1], float("nan"))
    else:
        first = (sync[:, :, 0] - probe.entry_sync_out.float()).norm(dim=-1, keepdim=True)
    return torch.cat([first, steps], dim=2)


def summarize_probe(
    layers: dict[int, CTMLayerProbe], token_mask: torch.Tensor | None = None
) -> dict[str, numpy.ndarray]:
    """Means over real tokens, per layer and tick: {"state_delta", "certainty", "sync_change"} each (n_layers, K)
    float arrays (NaN where the probe has no value), and "layers": the layer indices in row order.

    `token_mask` (B, T), bool or 0/1, marks the tokens to average (e.g. the attention mask, or easy/hard tokens);
    None averages every position."""
    if not layers:
        raise ValueError("layers is empty: probe a model with at least one thinking layer")
    order = sorted(layers)
    B, T, K = layers[order[0]].state_delta.shape
    if token_mask is None:
        weights = torch.ones(B, T)
    else:
        if tuple(token_mask.shape) != (B, T):
            raise ValueError(f"token_mask must have shape (batch, sequence) = {(B, T)}, got {tuple(token_mask.shape)}")
        weights = token_mask.detach().float().cpu()
    if float(weights.sum()) <= 0:
        raise ValueError("token_mask selects no token")

    def mean(values: torch.Tensor | None) -> numpy.ndarray:
        if values is None:
            return numpy.full(K, numpy.nan)
        values = values.detach().float().cpu()
        return ((values * weights[..., None]).sum((0, 1)) / weights.sum()).numpy()

    summary = {name: [] for name in METRICS}
    for idx in order:
        probe = layers[idx]
        summary["state_delta"].append(mean(probe.state_delta))
        summary["certainty"].append(mean(probe.certainty))
        summary["sync_change"].append(mean(sync_change(probe)))
    result = {name: numpy.stack(rows).astype(numpy.float64) for name, rows in summary.items()}
    result["layers"] = list(order)
    return result
