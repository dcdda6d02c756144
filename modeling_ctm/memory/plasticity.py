# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Hebbian plasticity: what an edit is (statistics in, a bounded weight edit out).

The seed asks "why do you remember some things and not others?" and answers: surprise gates what is written, only the
pairs whose synchronisation moved away from the blank start change, and homeostasis keeps the weights near where they
were. The reference's `compact_memory` (reference section 1.5) had that shape but could not store content: its readout
edit added a context-dependent scalar times the all-ones vector to the residual stream, its synapse edit used the mean
weight row as the "pre-synaptic activity", and its 1% norm clamp was re-based every call, so it compounded (1.01^n).

This rule keeps the shape (local, correlation-driven, no optimizer) and stores content:

* **Readout projection `out_proj` (delta rule, Widrow-Hoff).** pre = the readout synchronisation S_out of each token
  (at the tick the logits were read from); post = what the readout *should have added* to the residual stream: the
  prediction error at the logits, ``onehot(next token) - softmax(logits)``, brought back into the residual stream
  through the (fixed) head, ``e = diag(g_norm / rms(h)) W_head^T (onehot - p)``. The edit is the gated sum of the
  per-token outer products ``e_t S_t^T``. A delta rule and not a plain Hebbian/Oja rule because the post-synaptic
  term must carry the *target*: a Hebbian product with the actual output only re-amplifies what the model already
  predicts, whereas the delta rule moves the readout of a pattern towards the token that followed it, so re-exposure
  to the pattern (the same synchronisation) predicts that token more; and it is self-limiting (the error vanishes
  once the pattern is learned). For a linear readout this is the local LMS gradient, needing nothing but the
  readout's own input and the error at its output (no backpropagation through the network).
* **Last synapse layer `synapse.up[-1]` (Oja's rule).** There is no target for the synapse's output, so its edit is
  Oja's: ``dW = sum_t g_t (y_t x_t^T - diag(y_t^2) W)`` with x the layer's real input and y = W x its output at every
  tick. It strengthens the layer's response to the (surprising) inputs it saw, and Oja's decay term keeps each row's
  norm from running away on its own.

`PlasticityConfig(rule="delta")` replaces the readout edit by an associative memory written with the sequential delta
rule (`delta_write_map`): the key is S_out at the position before the value, centred on the running mean key and
normalised, the value the next token's direction through the head, and each write corrects what the rule's edit
already returns for that key (see `PlasticityConfig.rule`). Its pending writes are one affine map E -> E Q + R, not a
sum, so it runs in one process. With `targets=["mlp"]` the same write goes into the down projection of the MLP kept
beside the block (`ctm_mlp="keep"`), keyed by that MLP's hidden activation at the position before the value: ROME's
key, which carries the token's identity where S_out may not (measured: S_out keys of different names had |cos| 0.99).
A write needs the value's token in the same forward pass as its key: a message's last token (whose successor is the
model's own reply) and `generate`'s one-token steps write nothing.

Gates. Surprise, per token: the cross-entropy of the token that followed (prediction error, from `labels` when given,
else from the next input token, i.e. text already read), or the normalised entropy of the prediction (no target needed
for the gate), or none; each token's weight is ``clamp(s_t / mean(s), 0, gate_max)``. Novelty, per pair: only the
readout pairs whose gated mean synchronisation moved further from the blank start's synchronisation than the
`novelty_quantile` of all pairs (the median by default) change.

Homeostasis bounds what THE RULE adds, never what anything else did. The rule keeps its own accumulated edit E; the
ANCHOR is the weights without it (the weights when plasticity was enabled, plus every change made since by anything
else: the optimiser, sleep's consolidation, `learn_from`, which the rule follows and never undoes). Against the anchor,
never against the previous edit, so nothing compounds: each edit is capped at ``max_step * ||W_anchor||``, E at
``max_drift * ||W_anchor||``, and E is shortened until the norm of ``W_anchor + E``, as stored (bf16 included), is
inside ``[(1 - band), (1 + band)] * ||W_anchor||``. An optional `decay` shrinks E at every edit (Titans' forgetting
gate). Non-finite statistics never reach the
weights: a forward pass whose statistics are not finite contributes nothing (counted), and an edit whose reduced
statistics or result are not finite is skipped (counted). `reset_plasticity()` restores the anchors.

The statistics are one flat float64 tensor (`statistics()`), a sum over tokens: all-reduce it across ranks and every
rank computes the same edit. They are gathered by a `CTMTickObserver` (and, for the synapse input the tick event does
not expose, a forward hook on that one layer), registered only between `enable()` and `disable()`: with plasticity
off nothing is registered and the model's forward is untouched.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..io_ctm import atomic_write
from ..modeling_ctm import CTMForCausalLM
from ..observers_ctm import CTMLayerEvent, CTMOutputEvent, CTMTickEvent, CTMTickObserver


GATE_CHOICES = ("prediction_error", "entropy", "none")
TARGET_CHOICES = ("out_proj", "synapse", "mlp", "token_memory")
# the matrices whose output moves the logits directly (a target exists)
DELTA_TARGET_CHOICES = ("out_proj", "mlp", "token_memory")
DELTA_STEP_CHOICES = ("constant", "running_mean")
PRESYNAPTIC_CHOICES = ("raw", "centered", "whitened")
RULE_CHOICES = ("hebbian", "delta")
DELTA_PRESYNAPTIC_CHOICES = ("raw", "centered")


@dataclass
class PlasticityConfig:
    """What a Hebbian edit is allowed to do. Every field is checked; a bad value raises `ValueError` naming it.

    Args:
        learning_rate: step of the readout delta rule, per unit of gated mean outer product.
        synapse_learning_rate: step of the synapse's Oja rule.
        targets: which matrices are edited: any of "out_proj" (the readout projection) and "synapse" (the last
            layer of the U-Net synapse); under `rule="delta"` one of "out_proj" and "mlp" (the down projection of
            the MLP kept beside the block, `ctm_mlp="keep"`, keyed by its own input: the MLP's hidden activation at
            the position before the value, which carries the token's identity where S_out may not) and
            "token_memory" (the model's fast-weight memory, `ctm_token_memory="token"`: the key is the token before
            the value itself, one-hot, so different tokens' writes never interfere; see `delta_step`).
        layers: which thinking layers are edited: "last", "all", or a list of decoder-layer indices.
        gate: the per-token surprise: "prediction_error" (CE of the next token), "entropy" (normalised entropy of the
            prediction), or "none" (every token weighs 1).
        gate_max: the largest weight one token can get (its surprise over the mean surprise, clamped).
        novelty_quantile: readout pairs whose synchronisation moved more than this quantile of all pairs change
            (0.5: the median); 0 lets every pair change.
        band: the rule's edit keeps each edited matrix's norm within (1 +- band) x the norm of the same matrix without
            the rule's edit (its anchor), in the stored dtype.
        max_drift: the rule's accumulated edit stays below max_drift x the anchor norm.
        max_step: one edit is at most max_step x the anchor norm.
        decay: fraction of the rule's accumulated edit forgotten at each edit (0: none).
        presynaptic: the readout's pre-synaptic term: "raw" (S_t: the plain delta rule), "centered" (S_t minus its
            gated mean over the text read, Sejnowski's covariance rule: drops the part every pattern shares, a bias
            towards the text's average next token) or "whitened" (centered and divided per pair by its gated
            variance: what distinguishes the patterns read is stored at full strength). Under `rule="delta"` it
            is the key: "raw" (S_t, normalised) or "centered" (S_t with its component along the running mean key
            removed, normalised, so that different facts' keys are nearly orthogonal).
        rule: "hebbian" (the gated batch edits above, the default) or "delta": the readout becomes an associative
            memory written by the sequential delta rule (Widrow-Hoff / fast weights / DeltaNet), see
            `delta_write_map`: per token, key k = the readout synchronisation at the position *before* the value
            (the representation that has to predict it), value v = `delta_target_norm` x ||h_t|| x the unit
            direction of the next token's unembedding minus the expected one under the current prediction
            (``W^T (onehot - p)``, through the final norm's gain), and
            ``E <- E + beta (v - E S) k^T / ||P S||`` with beta = learning_rate x min(gate, 1). It corrects what the
            readout's edit already returns for that key (writing a fact twice does not double it) and leaves the
            output of a key orthogonal to k unchanged. Edits `out_proj` only; `novelty_quantile` is not used (the
            centred key already drops what every pattern shares); the surprise gate and the homeostasis are kept.
        delta_target_norm: the length of the delta rule's value v relative to the residual stream at that
            position (the final norm divides by the residual's scale, so a target in those units moves the logits
            by the same amount at every position).
        delta_step: how a write's step is set under `rule="delta"` on `token_memory`: "constant" (beta =
            learning_rate x min(gate, 1)) or "running_mean" (beta divided by the number of times the key token has
            been read, this one included: each slot holds the running mean of its prediction errors, which tends to
            zero for a calibrated model's frequent tokens, and is a whole step for a token told once). On
            `token_memory` the write is the delta rule of a softmax readout: ``m_x <- m_x + beta W^T (onehot(y) -
            p)``, the prediction error through the head (no normalisation: a prediction already right writes
            nothing), so `learning_rate` is in hidden units per unit of error and may exceed 1.
    """

    learning_rate: float = 1.0
    synapse_learning_rate: float = 0.01
    targets: tuple[str, ...] = ("out_proj", "synapse")
    layers: str | list[int] = "last"
    gate: str = "prediction_error"
    gate_max: float = 4.0
    novelty_quantile: float = 0.5
    band: float = 0.1
    max_drift: float = 0.3
    max_step: float = 0.1
    decay: float = 0.0
    presynaptic: str = "raw"
    rule: str = "hebbian"
    delta_target_norm: float = 1.0
    delta_step: str = "constant"

    def __post_init__(self):
        self.targets = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self.validate()

    def validate(self) -> None:
        def positive(name, allow_zero=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"PlasticityConfig.{name} must be a finite number {bound}, got {value!r}.")

        positive("learning_rate", allow_zero=True)
        positive("synapse_learning_rate", allow_zero=True)
        positive("gate_max")
        positive("band")
        positive("max_drift")
        positive("max_step")
        positive("delta_target_norm")
        for name, high in (("novelty_quantile", 1.0), ("decay", 1.0), ("band", 1.0)):
            value = getattr(self, name)
            if not (0.0 <= value < high):
                raise ValueError(f"PlasticityConfig.{name} must be in [0, {high}), got {value!r}.")
        if (
            not isinstance(self.targets, tuple)
            or not self.targets
            or any(t not in TARGET_CHOICES for t in self.targets)
            or len(set(self.targets)) != len(self.targets)
        ):
            raise ValueError(
                f"PlasticityConfig.targets must be a non-empty list of distinct values from {TARGET_CHOICES}, "
                f"got {self.targets!r}."
            )
        if self.presynaptic not in PRESYNAPTIC_CHOICES:
            raise ValueError(
                f"PlasticityConfig.presynaptic must be one of {PRESYNAPTIC_CHOICES}, got {self.presynaptic!r}."
            )
        if self.gate not in GATE_CHOICES:
            raise ValueError(f"PlasticityConfig.gate must be one of {GATE_CHOICES}, got {self.gate!r}.")
        if self.rule not in RULE_CHOICES:
            raise ValueError(f"PlasticityConfig.rule must be one of {RULE_CHOICES}, got {self.rule!r}.")
        if self.rule == "delta":
            if len(self.targets) != 1 or self.targets[0] not in DELTA_TARGET_CHOICES:
                raise ValueError(
                    f"PlasticityConfig.targets must be one of {[[t] for t in DELTA_TARGET_CHOICES]} with rule='delta', "
                    f"got {list(self.targets)!r}: the delta rule corrects a matrix whose output moves the logits "
                    "towards a target, and the synapse has none."
                )
            if self.presynaptic not in DELTA_PRESYNAPTIC_CHOICES:
                raise ValueError(
                    f"PlasticityConfig.presynaptic must be one of {DELTA_PRESYNAPTIC_CHOICES} with rule='delta' "
                    f"(the key), got {self.presynaptic!r}."
                )
            if self.delta_step not in DELTA_STEP_CHOICES:
                raise ValueError(
                    f"PlasticityConfig.delta_step must be one of {DELTA_STEP_CHOICES}, got {self.delta_step!r}."
                )
            if self.delta_step != "constant" and self.targets != ("token_memory",):
                raise ValueError(
                    f"PlasticityConfig.delta_step={self.delta_step!r} needs targets=['token_memory'] (a count per key "
                    f"exists for one-hot keys only), got targets={list(self.targets)!r}."
                )
            if self.learning_rate > 1.0 and self.targets != ("token_memory",):
                raise ValueError(
                    f"PlasticityConfig.learning_rate must be in [0, 1] with rule='delta', got {self.learning_rate!r}: "
                    "a step of 1 stores the value exactly, a larger one overshoots it."
                )
        elif "mlp" in self.targets or "token_memory" in self.targets:
            raise ValueError(
                f"PlasticityConfig.targets={list(self.targets)!r} is invalid with rule={self.rule!r}: 'mlp' and "
                "'token_memory' are targets of rule='delta' only (the Hebbian rule's statistics are the block's own)"
            )
        layers_ok = self.layers in ("last", "all") or (
            isinstance(self.layers, list)
            and self.layers
            and all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        )
        if not layers_ok:
            raise ValueError(
                f"PlasticityConfig.layers must be 'last', 'all' or a non-empty list of layer indices, got {self.layers!r}."
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PlasticityConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"PlasticityConfig got unknown fields {sorted(unknown)}; allowed: {sorted(known)}.")
        return cls(**data)


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

    def __init__(self, rule: "HebbianPlasticity"):
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


class HebbianPlasticity:
    """The rule, bound to one model. `enable()` anchors the target weights and starts gathering statistics in every
    forward pass; `apply()` turns them into one bounded edit; `reset_plasticity()` takes the rule's edits out again
    (and only them: what the optimiser or sleep changed meanwhile stays).

        rule = HebbianPlasticity(model, PlasticityConfig()).enable()
        model(input_ids)            # reading: statistics gathered, weights unchanged
        rule.apply()                # one edit from everything read since the last edit
        rule.reset_plasticity()     # undo every edit
        rule.disable()              # nothing registered any more
    """

    def __init__(self, model: CTMForCausalLM, config: PlasticityConfig | None = None):
        if not isinstance(model, CTMForCausalLM):
            raise TypeError(f"model must be a CTMForCausalLM, got {type(model).__name__}.")
        self.model = model
        self.config = config if config is not None else PlasticityConfig()
        if not isinstance(self.config, PlasticityConfig):
            raise TypeError(f"config must be a PlasticityConfig, got {type(self.config).__name__}.")
        self.config.validate()
        thinking = [layer.layer_idx for layer in model.model.layers if layer.is_thinking]
        if not thinking:
            raise ValueError("HebbianPlasticity needs a model with at least one thinking layer (ctm_layers='none').")
        if getattr(model.config, "ctm_readout_norm", "none") != "none":
            # the delta rule's pre-synaptic term is the raw S_out; a normalised (or gated) readout reads another input
            raise ValueError(
                f"HebbianPlasticity supports ctm_readout_norm='none' only (got {model.config.ctm_readout_norm!r}): "
                "its readout edit is computed from the raw output synchronisation"
            )
        n_layers = model.config.num_hidden_layers
        if self.config.layers == "last":
            self.layer_indices = [thinking[-1]]
        elif self.config.layers == "all":
            self.layer_indices = thinking
        else:
            self.layer_indices = sorted({i % n_layers for i in self.config.layers})
            missing = [i for i in self.layer_indices if i not in thinking]
            if missing:
                raise ValueError(
                    f"PlasticityConfig.layers names layers {missing} that do not think; thinking layers: {thinking}."
                )
        self.edits_out_proj = "out_proj" in self.config.targets
        self.edits_synapse = "synapse" in self.config.targets
        self.edits_mlp = "mlp" in self.config.targets
        self.edits_token_memory = "token_memory" in self.config.targets
        names = {id(p): n for n, p in model.named_parameters()}
        self.targets: list[_Target] = []
        for idx in self.layer_indices:
            block = model.model.layers[idx].thinking
            if self.edits_out_proj:
                self.targets.append(_Target(names[id(block.out_proj.weight)], block.out_proj.weight, "out_proj", idx))
            if self.edits_synapse:
                weight = block.synapse.up[-1].weight
                self.targets.append(_Target(names[id(weight)], weight, "synapse", idx))
            if self.edits_mlp:
                mlp = model.model.layers[idx].mlp
                if mlp is None:
                    raise ValueError(
                        f"PlasticityConfig.targets=['mlp'] needs an MLP beside the block of layer {idx}: this model has "
                        f"ctm_mlp={model.config.ctm_mlp!r}; allowed is a model converted with ctm_mlp='keep'"
                    )
                weight = mlp.down_proj.weight
                self.targets.append(_Target(names[id(weight)], weight, "mlp", idx))
        if self.edits_token_memory:
            memory = model.model.token_memory
            if memory is None:
                raise ValueError(
                    "PlasticityConfig.targets=['token_memory'] needs the model's fast-weight memory: this model has "
                    f"ctm_token_memory={model.config.ctm_token_memory!r}; allowed is a model with "
                    "ctm_token_memory='token' (e.g. from_pretrained(path, ctm_token_memory='token'))"
                )
            last = model.config.num_hidden_layers - 1
            self.targets.append(_Target(names[id(memory.weight)], memory.weight, "token_memory", last))
        self.anchors: dict[str, torch.Tensor] = {}  # the targets without the rule's edit
        self._written: dict[str, torch.Tensor] = {}  # the targets as the rule last left them: anchor + its edit
        self.edits_applied = 0
        self.edits_skipped = 0  # reduced statistics or result not finite
        self.batches_skipped = 0  # forward passes whose statistics were not finite (this process)
        self.observer: HebbianPlasticityObserver | None = None
        self._handles: list = []
        # a Trainer's evaluation passes must not write into the weights: the callback gathers in training mode only
        self.gather_in_eval_mode = True
        self._layout = self._statistics_layout()
        self._stats = torch.zeros(sum(math.prod(shape) for _, shape in self._layout), dtype=torch.float64)
        # the delta rule's running mean key per target (sum and count of every key read): it is about the input
        # distribution, not an edit, so neither `apply` nor `reset_plasticity` drops it
        self.key_sums: dict[str, torch.Tensor] = {}
        self.key_counts: dict[str, float] = {}
        if self.config.rule == "delta":
            for target in self.targets:
                # a token memory's keys are one-hot: their sum is the count of each token read (its `delta_step`)
                size = target.param.shape[0] if target.kind == "token_memory" else target.param.shape[1]
                self.key_sums[target.name] = torch.zeros(size, dtype=torch.float64)
                self.key_counts[target.name] = 0.0
        self.last_write: dict[str, torch.Tensor] = {}  # the delta rule's keys of the last forward pass (diagnostics)

    # -- the switch ----------------------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.observer is not None

    def enable(self) -> "HebbianPlasticity":
        """Start gathering statistics in every forward pass. The first call anchors the target weights."""
        if self.enabled:
            return self
        if not self.anchors:
            self.set_anchors()
        self.observer = HebbianPlasticityObserver(self)
        self._handles = [self.model.add_tick_observer(self.observer)]
        if self.edits_synapse:
            for idx in self.layer_indices:
                up_last = self.model.model.layers[idx].thinking.synapse.up[-1]
                self._handles.append(up_last.register_forward_hook(self.observer.synapse_hook(idx)))
        if self.edits_mlp:  # the MLP's hidden activation is no part of the tick events: a hook on its down projection
            for idx in self.layer_indices:
                down = self.model.model.layers[idx].mlp.down_proj
                self._handles.append(down.register_forward_hook(self.observer.mlp_hook(idx)))
        return self

    def disable(self) -> None:
        """Stop gathering: nothing stays registered on the model. Anchors and statistics are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.observer = None

    def __enter__(self) -> "HebbianPlasticity":
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def set_anchors(self) -> None:
        """Anchor every target at its current weights, with no edit of the rule's yet (the band, the drift bound and
        `reset_plasticity` refer to it)."""
        self.anchors = {t.name: t.param.detach().clone() for t in self.targets}
        self._written = {name: anchor.clone() for name, anchor in self.anchors.items()}
        kinds = {t.name: t.kind for t in self.targets}
        for name, anchor in self.anchors.items():
            if kinds[name] == "token_memory":  # an empty memory is its natural start; its bounds are the head's
                if not torch.isfinite(anchor).all():
                    raise ValueError(f"{name} is not finite; the rule refuses to write into it.")
                continue
            if not torch.isfinite(anchor).all() or float(anchor.float().norm()) == 0.0:
                raise ValueError(
                    f"{name} has a zero or non-finite norm; a band around it allows no edit (train the model first)."
                )

    @torch.no_grad()
    def follow_other_changes(self) -> None:
        """Move each anchor by whatever changed the target since the rule last wrote it (an optimiser step, sleep,
        `learn_from`): the rule's own edit stays what it was, and nothing the others did is undone. Every method that
        reads the anchors calls this first."""
        for target in self.targets:
            written = self._written.get(target.name)
            if written is None or torch.equal(target.param, written):
                continue
            edit = written.to(torch.float64) - self.anchors[target.name].to(torch.float64)
            self.anchors[target.name] = (target.param.detach().to(torch.float64) - edit).to(target.param.dtype)
            self._written[target.name] = target.param.detach().clone()

    def edits(self) -> dict[str, torch.Tensor]:
        """The rule's accumulated edit of each target (float64): the weights minus their anchors."""
        self.follow_other_changes()
        return {
            name: self._written[name].to(torch.float64) - anchor.to(torch.float64)
            for name, anchor in self.anchors.items()
        }

    @torch.no_grad()
    def set_edits(self, edits: dict[str, torch.Tensor]) -> None:
        """Make `edits` the rule's accumulated edit of the named targets exactly, with no homeostasis (a control arm's
        edit: a random or a gradient direction of a given norm)."""
        if not self.anchors:
            self.set_anchors()
        self.follow_other_changes()
        for target in self.targets:
            if target.name in edits:
                new = self.anchors[target.name].to(torch.float64) + edits[target.name].to(torch.float64)
                target.param.copy_(new.to(target.param.dtype))
                self._written[target.name] = target.param.detach().clone()

    @torch.no_grad()
    def reset_plasticity(self) -> None:
        """Undo every edit of the rule's: the targets return to their anchors (which include what anything else
        changed meanwhile), and gathered statistics are dropped."""
        self.follow_other_changes()
        for target in self.targets:
            if target.name in self.anchors:
                target.param.copy_(self.anchors[target.name])
                self._written[target.name] = self.anchors[target.name].clone()
        self.reset_statistics()

    # -- statistics ----------------------------------------------------------------------------------------------------

    def _statistics_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        layout = []
        if self.config.rule == "delta":
            # the pending writes as one affine map E -> E Q + R (`delta_write_map`), stored as Q - I so that zero
            # statistics are the identity; an ordered composition, not a sum
            for target in self.targets:
                if target.kind == "token_memory":  # additive writes per slot, and how many keys each slot read
                    layout.append((f"{target.name}:sum", tuple(target.param.shape)))
                    layout.append((f"{target.name}:count", (target.param.shape[0],)))
                    continue
                out_features, in_features = target.param.shape
                layout.append((f"{target.name}:Q", (in_features, in_features)))
                layout.append((f"{target.name}:R", (out_features, in_features)))
            return layout + [("gate_sum", (1,)), ("tokens", (1,)), ("batches_skipped", (1,))]
        for target in self.targets:
            out_features, in_features = target.param.shape
            layout.append((f"{target.name}:corr", (out_features, in_features)))
            # out_proj: gated sum of the readout sync (for novelty); synapse: gated sum of y^2 (Oja's decay)
            layout.append((f"{target.name}:aux", (in_features if target.kind == "out_proj" else out_features,)))
            if target.kind == "out_proj":  # gated sums of the error and of S^2 (the covariance forms need them)
                layout.append((f"{target.name}:post", (out_features,)))
                layout.append((f"{target.name}:pre_sq", (in_features,)))
        layout += [("gate_sum", (1,)), ("tokens", (1,)), ("batches_skipped", (1,))]
        return layout

    def statistics(self) -> torch.Tensor:
        """The gathered statistics as one flat float64 tensor (sums over tokens): all-reduce (sum) it across ranks,
        then `apply(reduced)`."""
        return self._stats.clone()

    def reset_statistics(self) -> None:
        self._stats.zero_()

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if flat.shape != self._stats.shape:
            raise ValueError(f"statistics must be a flat tensor of {self._stats.numel()} values, got {tuple(flat.shape)}.")
        parts, offset = {}, 0
        for name, shape in self._layout:
            size = math.prod(shape)
            parts[name] = flat[offset : offset + size].view(shape)
            offset += size
        return parts

    @torch.no_grad()
    def _accumulate(self, event: CTMOutputEvent, observer: HebbianPlasticityObserver) -> None:
        model, config = self.model, self.config
        if not model.training and not self.gather_in_eval_mode:
            return
        logits = event.logits.detach().float()
        B, T, V = logits.shape
        if T < 2 or (self.edits_out_proj and any(i not in observer.sync for i in self.layer_indices)):
            return
        # targets: the next token (labels when given, else the text that was read), never padding
        source = event.labels if event.labels is not None else event.input_ids
        if source is None:
            return
        target = source[:, 1:].to(logits.device)
        real = target != -100
        if event.attention_mask is not None and event.attention_mask.dim() == 2:
            mask = event.attention_mask[:, -T:].bool().to(logits.device)
            real &= mask[:, 1:] & mask[:, :-1]
        if not real.any():
            return
        target = torch.where(real, target, 0)
        log_probs = F.log_softmax(logits[:, :-1], dim=-1)  # positions 0..T-2 predict tokens 1..T-1
        ce = -log_probs.gather(-1, target[..., None])[..., 0]
        if config.gate == "prediction_error":
            surprise = ce
        elif config.gate == "entropy":
            surprise = -(log_probs.exp() * log_probs).sum(-1) / math.log(V)
        else:
            surprise = torch.ones_like(ce)
        surprise = torch.where(real, surprise, 0.0)
        mean_surprise = surprise.sum() / real.sum()
        gate = (surprise / mean_surprise.clamp_min(1e-12)).clamp(0.0, config.gate_max) * real
        if config.rule == "delta":
            self._accumulate_delta(event, observer, gate, target, real, log_probs)
            return

        contribution = torch.zeros_like(self._stats)
        parts = self._unflatten(contribution)
        selected = event.selected_tick
        last_layer = model.config.num_hidden_layers - 1
        norm = model.model.norm
        head = model.lm_head.weight.detach().float()
        error = None
        for target_entry in self.targets:
            idx = target_entry.layer_idx
            if target_entry.kind == "out_proj":
                sync = observer.sync[idx]  # (B, T, K, S)
                K = sync.shape[2]
                if idx == last_layer and selected is not None:
                    tick = selected.to(sync.device)
                else:
                    tick = torch.full((B, T), K - 1, device=sync.device)
                pre = sync.gather(2, tick[..., None, None].expand(B, T, 1, sync.shape[-1]))[:, :, 0]  # (B, T, S)
                if error is None:
                    # what the readout should have added: the logit error through the head and the final norm's
                    # per-token scale (exact for the last layer up to the norm's projection term)
                    probs = log_probs.exp()
                    logit_error = -probs
                    logit_error.scatter_add_(-1, target[..., None], torch.ones_like(ce)[..., None])
                    scale = norm.weight.detach().float()
                    if idx == last_layer and idx in observer.residual:
                        h = observer.residual[idx].float() + target_entry.param.detach().float().matmul(
                            pre.transpose(-1, -2)
                        ).transpose(-1, -2)
                        inv_rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)[:, :-1]
                    else:
                        inv_rms = 1.0
                    error = (logit_error @ head) * scale * inv_rms  # (B, T-1, D)
                weighted = error * gate[..., None]
                pre = pre[:, :-1]
                parts[f"{target_entry.name}:corr"].copy_(torch.einsum("btd,bts->ds", weighted, pre))
                parts[f"{target_entry.name}:aux"].copy_(torch.einsum("bt,bts->s", gate, pre))
                parts[f"{target_entry.name}:post"].copy_(weighted.sum((0, 1)))
                parts[f"{target_entry.name}:pre_sq"].copy_(torch.einsum("bt,bts->s", gate, pre * pre))
            else:
                io = observer.synapse_io.get(idx)
                if io is None:
                    continue
                x, y = io[0][:, :-1], io[1][:, :-1]  # (B, T-1, K, in), (B, T-1, K, D)
                gy = y * gate[..., None, None]
                parts[f"{target_entry.name}:corr"].copy_(torch.einsum("btkd,btki->di", gy, x))
                parts[f"{target_entry.name}:aux"].copy_(torch.einsum("btkd,btkd->d", gy, y))
        parts["gate_sum"][0] = gate.sum()
        parts["tokens"][0] = real.sum()
        if torch.isfinite(contribution).all():
            self._stats += contribution
        else:  # never let a non-finite forward reach the weights
            self._stats[-1] += 1
            self.batches_skipped += 1

    def key_mean(self, name: str | None = None) -> torch.Tensor | None:
        """The delta rule's running mean key of target `name` (default: the first), None before any key was read."""
        name = self.targets[0].name if name is None else name
        count = self.key_counts.get(name, 0.0)
        return None if count == 0 else self.key_sums[name] / count

    @torch.no_grad()
    def _accumulate_delta(self, event, observer, gate, target, real, log_probs) -> None:
        """The delta rule's reading: every real position t < T-1 writes (key S_t at the ticks read, value v_t, step
        beta_t) in order; the writes become one affine map composed after the pending one."""
        model, config = self.model, self.config
        B, T1 = gate.shape
        head = model.lm_head.weight.detach().float()
        gain = model.model.norm.weight.detach().float()
        # the value: the direction that raises the next token's log-probability most per unit length, i.e. its
        # unembedding against the tokens the model now expects (W^T (onehot - p), through the final norm's gain):
        # the competitors it must beat, not the vocabulary's average; no backward pass needed
        probs = log_probs.exp()
        expected = probs @ head  # (B, T-1, D)
        direction = F.normalize((head[target] - expected) * gain, dim=-1)
        last_layer = model.config.num_hidden_layers - 1
        selected = event.selected_tick
        contribution = torch.zeros_like(self._stats)
        parts = self._unflatten(contribution)
        for target_entry in self.targets:
            idx = target_entry.layer_idx
            if target_entry.kind == "token_memory":
                self._write_token_memory(target_entry, event, gate, target, real, probs, head, parts)
                continue
            if target_entry.kind == "mlp":
                hidden = observer.mlp_input.get(idx)
                if hidden is None:
                    return
                keys = hidden.to(torch.float64)[:, :-1, None]  # (B, T-1, 1, I): the MLP runs once, not per tick
            else:
                sync = observer.sync[idx].to(torch.float64)  # (B, T, K, S)
                K = sync.shape[2]
                if idx == last_layer and selected is None and model.config.ctm_readout == "tick_mixture":
                    keys = sync[:, :-1]  # every tick's logits are read: each must return the value
                else:
                    tick = selected.to(sync.device) if idx == last_layer and selected is not None else None
                    if tick is None:
                        tick = torch.full((B, T1 + 1), K - 1, device=sync.device)
                    keys = sync.gather(2, tick[..., None, None].expand(B, T1 + 1, 1, sync.shape[-1]))[:, :-1]
            ticks = keys.shape[2]
            residual = observer.residual.get(idx)
            if residual is None:
                return
            stream = residual.float() + observer.output[idx].float()
            size = stream[:, :-1].norm(dim=-1, keepdim=True)  # (B, T-1, 1)
            values = (config.delta_target_norm * size * direction).to(torch.float64)
            betas = config.learning_rate * gate.clamp(max=1.0).to(torch.float64)
            rows = real[..., None].expand(B, T1, ticks).reshape(-1).to(keys.device)
            flat_keys = keys.reshape(-1, keys.shape[-1])[rows]
            flat_values = values[:, :, None].expand(B, T1, ticks, values.shape[-1]).reshape(-1, values.shape[-1])
            flat_values = flat_values[rows.to(flat_values.device)]
            flat_betas = betas[..., None].expand(B, T1, ticks).reshape(-1)[rows.to(betas.device)]
            name = target_entry.name
            # centred by the mean of the keys read before this pass: a text's own keys would cancel a lone fact
            mean = self.key_mean(name) if config.presynaptic == "centered" else None
            if config.presynaptic == "centered":
                self.key_sums[name] += flat_keys.sum(0).cpu()
                self.key_counts[name] += float(flat_keys.shape[0])
            Q, R = delta_write_map(flat_keys, flat_values, flat_betas, mean)
            written = centred_keys(flat_keys, mean)
            grid = torch.meshgrid(torch.arange(B), torch.arange(T1), torch.arange(ticks), indexing="ij")
            self.last_write = {
                "keys": F.normalize(written, dim=-1).float(),  # unit centred keys, rows in write order
                "positions": torch.stack(grid, -1).reshape(-1, 3)[rows.cpu()],  # (batch row, position, tick)
                "betas": flat_betas.float(),
            }
            pending = self._unflatten(self._stats)
            pending_q = pending[f"{name}:Q"] + torch.eye(Q.shape[0], dtype=torch.float64)
            # composed after what is pending: E -> (E Q1 + R1) Q + R
            parts[f"{name}:Q"].copy_(pending_q @ Q - torch.eye(Q.shape[0], dtype=torch.float64))
            parts[f"{name}:R"].copy_(pending[f"{name}:R"] @ Q + R)
        parts["gate_sum"][0] = self._unflatten(self._stats)["gate_sum"][0] + gate.sum()
        parts["tokens"][0] = self._unflatten(self._stats)["tokens"][0] + real.sum()
        parts["batches_skipped"][0] = self._stats[-1]
        if torch.isfinite(contribution).all():
            self._stats.copy_(contribution)
        else:  # never let a non-finite forward reach the weights
            self._stats[-1] += 1
            self.batches_skipped += 1

    @torch.no_grad()
    def _write_token_memory(self, target_entry, event, gate, target, real, probs, head, parts) -> None:
        """A token memory's writes of one forward pass: slot x_t (the token before the value) gets beta_t times the
        prediction error through the head, ``W^T (onehot(y_t) - p_t)``, the gradient of log p(y_t) with respect to
        the final-normed hidden state the slot is added to (exact: no norm lies between). Under `delta_step=
        "running_mean"` beta_t is divided by how often x_t has been read, this occurrence included."""
        config, name = self.config, target_entry.name
        source = event.input_ids
        if source is None:
            return
        B, T1 = gate.shape
        keys = source[:, :T1].to(real.device)  # the token at the position before each value
        errors = (head[target] - probs @ head).to(torch.float64)  # (B, T-1, D)
        betas = config.learning_rate * gate.clamp(max=1.0).to(torch.float64) * real
        flat_keys = keys.reshape(-1)[real.reshape(-1)].cpu()
        counts = self.key_sums[name]
        if config.delta_step == "running_mean":
            # occurrence rank of each key in reading order, after every earlier pass's reads
            order = flat_keys
            rank = torch.zeros_like(order, dtype=torch.float64)
            seen: dict[int, int] = {}
            for i, token in enumerate(order.tolist()):
                seen[token] = seen.get(token, 0) + 1
                rank[i] = counts[token] + seen[token]
            scale = torch.zeros(B * T1, dtype=torch.float64)
            scale[real.reshape(-1).cpu()] = 1.0 / rank
            betas = betas * scale.view(B, T1).to(betas.device)
        read = torch.zeros_like(counts).index_add_(0, flat_keys, torch.ones(flat_keys.shape[0], dtype=torch.float64))
        counts += read
        self.key_counts[name] += float(flat_keys.shape[0])
        writes = torch.zeros(target_entry.param.shape, dtype=torch.float64, device=errors.device)
        writes.index_add_(0, keys.reshape(-1), (errors * betas[..., None]).reshape(-1, errors.shape[-1]))
        pending = self._unflatten(self._stats)
        parts[f"{name}:sum"].copy_(pending[f"{name}:sum"] + writes.cpu())
        parts[f"{name}:count"].copy_(pending[f"{name}:count"] + read)
        self.last_write = {"keys": flat_keys, "betas": betas[real].float().cpu()}

    # -- the edit ------------------------------------------------------------------------------------------------------

    def compute_deltas(self, statistics: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """The raw edit of every target from (reduced) statistics, before homeostasis; None if there is nothing to
        apply or the statistics are not finite."""
        flat = self._stats if statistics is None else statistics.to(torch.float64)
        if not torch.isfinite(flat).all():
            return None
        parts = self._unflatten(flat)
        gate_sum = float(parts["gate_sum"][0])
        if gate_sum <= 0:
            return {}
        config = self.config
        deltas = {}
        if config.rule == "delta":
            edits = self.edits()
            for target in self.targets:
                if target.kind == "token_memory":
                    deltas[target.name] = parts[f"{target.name}:sum"].clone()
                    continue
                edit = edits[target.name]
                # E Q + R - E: the pending writes applied to the rule's edit as it stands now
                deltas[target.name] = edit @ parts[f"{target.name}:Q"] + parts[f"{target.name}:R"]
            return deltas
        for target in self.targets:
            weight = target.param.detach().to(torch.float64)
            corr = parts[f"{target.name}:corr"] / gate_sum
            aux = parts[f"{target.name}:aux"] / gate_sum
            if target.kind == "out_proj":
                if config.presynaptic != "raw":  # sum_t g_t e_t (S_t - mean S)^T = sum g e S^T - (sum g e) mean S^T
                    corr = corr - torch.outer(parts[f"{target.name}:post"] / gate_sum, aux)
                if config.presynaptic == "whitened":
                    variance = (parts[f"{target.name}:pre_sq"] / gate_sum - aux * aux).clamp_min(0.0)
                    corr = corr / (variance + 1e-6 * variance.mean() + 1e-12)[None, :]
                delta = config.learning_rate * corr
                if config.novelty_quantile > 0:
                    block = self.model.model.layers[target.layer_idx].thinking
                    start = block.start(torch.float32)
                    blank = block.sync_out.read(start.alpha_out, start.beta_out)[0].to(torch.float64)
                    novelty = (aux - blank).abs()
                    novel = novelty > torch.quantile(novelty, config.novelty_quantile)
                    delta = delta * novel[None, :]
            else:
                # Oja: y x^T - diag(y^2) W; the ticks per token are part of the sum
                delta = config.synapse_learning_rate * (corr - aux[:, None] * weight)
            deltas[target.name] = delta
        return deltas

    @torch.no_grad()
    def apply(self, statistics: torch.Tensor | None = None) -> dict:
        """One edit from `statistics` (default: what this process gathered since the last edit), then the gathered
        statistics are reset. Returns a small report: applied, skipped, and each target's norm over its anchor."""
        deltas = self.compute_deltas(statistics)
        self.reset_statistics()
        if deltas is None:
            self.edits_skipped += 1
            return {"applied": False, "skipped": True}
        if not deltas:
            return {"applied": False, "skipped": False}
        return self.apply_deltas(deltas)

    @torch.no_grad()
    def apply_deltas(self, deltas: dict[str, torch.Tensor]) -> dict:
        """Add raw edits (from this rule, or a control: a random or a gradient edit) to the rule's accumulated edit
        under the homeostasis: step cap, decay and drift bound of the accumulated edit, norm band around the anchor's
        norm. All or nothing: if any result is not finite no target changes."""
        if not self.anchors:
            self.set_anchors()
        config = self.config
        edits = self.edits()
        new_weights = {}
        for target in self.targets:
            if target.name not in deltas:
                continue
            anchor = self.anchors[target.name].to(torch.float64)
            reference = self.reference_norm(target)
            # a token memory is bounded slot by slot (its rows): writes under frequent tokens must not shrink a
            # fact stored under another token, which one bound on the whole matrix would do
            dims = (-1,) if target.kind == "token_memory" else None
            delta = _cap(deltas[target.name].to(torch.float64), config.max_step * reference, dims)
            edit = _cap((1.0 - config.decay) * edits[target.name] + delta, config.max_drift * reference, dims)
            if target.kind == "token_memory":  # no band around an empty memory: the slot bound is its bound
                new_weights[target.name] = (anchor + edit).to(target.param.dtype)
            else:
                new_weights[target.name] = _inside_band(anchor, edit, config.band, target.param.dtype)
        if not all(torch.isfinite(w).all() for w in new_weights.values()):
            self.edits_skipped += 1
            return {"applied": False, "skipped": True}
        for target in self.targets:
            if target.name in new_weights:
                target.param.copy_(new_weights[target.name])
                self._written[target.name] = target.param.detach().clone()
        self.edits_applied += 1
        return {"applied": True, "skipped": False, "norm_ratio": self.norm_ratios()}

    def norm_ratios(self) -> dict[str, float]:
        """Each target's norm over its anchor's norm (homeostasis keeps it inside 1 +- band); for a token memory, its
        largest slot edit over the head's RMS row norm (the drift bound keeps it at most `max_drift`)."""
        self.follow_other_changes()
        ratios = {}
        for t in self.targets:
            if t.kind == "token_memory":
                edit = t.param.detach().double() - self.anchors[t.name].double()
                ratios[t.name] = float(edit.norm(dim=-1).max() / self.reference_norm(t))
            else:
                ratios[t.name] = float(t.param.detach().double().norm() / self.anchors[t.name].double().norm())
        return ratios

    def reference_norm(self, target: _Target) -> torch.Tensor:
        """The norm the step cap and the drift bound are fractions of: the anchor's, or for a token memory (whose
        anchor is empty; bounded per slot) the RMS norm of the head's rows, which its values are made of."""
        if target.kind == "token_memory":
            head = self.model.lm_head.weight.detach().to(torch.float64)
            return head.norm() / math.sqrt(head.shape[0])
        return self.anchors[target.name].to(torch.float64).norm()

    # -- persistence (safetensors + JSON, written by the callback) -----------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, json-able metadata): the anchors, the weights as the rule left them (so its edit is known exactly
        after a load), the pending statistics, the counters and the config."""
        self.follow_other_changes()
        tensors = {f"anchor.{name}": anchor.contiguous() for name, anchor in self.anchors.items()}
        tensors.update({f"written.{name}": w.contiguous() for name, w in self._written.items()})
        tensors["statistics"] = self._stats.clone()
        for name, key_sum in self.key_sums.items():
            tensors[f"key_sum.{name}"] = key_sum.clone()
            tensors[f"key_count.{name}"] = torch.tensor([self.key_counts[name]], dtype=torch.float64)
        meta = {
            "config": self.config.to_dict(),
            "edits_applied": self.edits_applied,
            "edits_skipped": self.edits_skipped,
            "batches_skipped": self.batches_skipped,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        anchors = {k[len("anchor.") :]: v for k, v in tensors.items() if k.startswith("anchor.")}
        expected = {t.name for t in self.targets}
        if set(anchors) != expected:
            raise ValueError(f"saved plasticity anchors {sorted(anchors)} do not match the targets {sorted(expected)}.")
        device = self.targets[0].param.device
        self.anchors = {name: anchors[name].to(device) for name in anchors}
        written = {k[len("written.") :]: v.to(device) for k, v in tensors.items() if k.startswith("written.")}
        # a state written before the rule kept its own edit: the whole distance to the anchor counts as the rule's
        self._written = written if set(written) == expected else {t.name: t.param.detach().clone() for t in self.targets}
        stats = tensors.get("statistics")
        if stats is not None:
            self._stats.copy_(stats.to(torch.float64))
        else:
            self._stats.zero_()
        for name in self.key_sums:
            if f"key_sum.{name}" in tensors:
                self.key_sums[name] = tensors[f"key_sum.{name}"].to(torch.float64).cpu().clone()
                self.key_counts[name] = float(tensors[f"key_count.{name}"][0])
        self.edits_applied = int(meta.get("edits_applied", 0))
        self.edits_skipped = int(meta.get("edits_skipped", 0))
        self.batches_skipped = int(meta.get("batches_skipped", 0))


def _cap(tensor: torch.Tensor, bound: torch.Tensor | float, dims: tuple[int, ...] | None) -> torch.Tensor:
    """`tensor` shortened to norm <= bound: as a whole (`dims=None`), or each slice along `dims` on its own."""
    norm = tensor.norm() if dims is None else tensor.norm(dim=dims, keepdim=True)
    return tensor * torch.clamp(bound / norm.clamp_min(1e-300), max=1.0)


def _inside_band(anchor: torch.Tensor, edit: torch.Tensor, band: float, dtype: torch.dtype) -> torch.Tensor:
    """`anchor + s * edit` in `dtype` for the largest s in [0, 1] (found by bisection, on the stored values) whose
    norm lies within (1 +- band) x ||anchor||. s = 0 always does: the anchor is stored in `dtype` already."""
    anchor_norm = anchor.norm()
    low, high = (1.0 - band) * anchor_norm, (1.0 + band) * anchor_norm

    def stored(scale: float) -> tuple[bool, torch.Tensor]:
        weight = (anchor + scale * edit).to(dtype)
        norm = weight.to(torch.float64).norm()
        return bool(low <= norm <= high), weight

    fits, weight = stored(1.0)
    if fits or not torch.isfinite(edit).all():
        return weight
    inside, outside, best = 0.0, 1.0, anchor.to(dtype)
    for _ in range(40):
        middle = 0.5 * (inside + outside)
        fits, candidate = stored(middle)
        if fits:
            inside, best = middle, candidate
        else:
            outside = middle
    return best


def centred_keys(keys: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """`keys` (n, S) with their component along the unit mean key removed (P s, P = I - m m^T); as they are without a
    mean. A projection and not `s - mean`, so that the edit stays linear in s: the readout matrix applied to the raw
    synchronisation S sees exactly the centred key (E S = E P S for every E the rule writes)."""
    keys = keys.to(torch.float64)
    if mean is None:
        return keys
    mean = mean.to(keys)
    norm = mean.norm()
    if norm == 0:
        return keys
    unit = mean / norm
    return keys - (keys @ unit)[:, None] * unit


def delta_write_map(
    keys: torch.Tensor, values: torch.Tensor, betas: torch.Tensor, mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential delta-rule writes of rows i = 0..n-1 of `keys` (n, S), `values` (n, D) and `betas` (n,), as one
    affine map of the memory (the recurrence is affine in it): returns float64 (Q, R) with ``E_after = E Q + R`` for
    every memory E (D, S).

    Row i writes ``E <- E + b_i (v_i - E s_i) a_i^T`` with ``a_i = P s_i / ||P s_i||^2`` (`centred_keys`: P removes
    the mean key's direction; P = I without `mean`). After it ``E s_i = (1 - b_i) E s_i + b_i v_i``: with b_i = 1 the
    memory returns v_i exactly, writing the same pair again changes nothing, and the output of every s with P s
    orthogonal to P s_i stays as it was. A key with no component left after centring writes nothing."""
    keys = keys.to(torch.float64)
    values = values.to(torch.float64)
    betas = betas.to(torch.float64).flatten()
    if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0] or betas.numel() != keys.shape[0]:
        raise ValueError(
            f"delta_write_map needs keys (n, S), values (n, D) and betas (n,), got {tuple(keys.shape)}, "
            f"{tuple(values.shape)}, {tuple(betas.shape)}"
        )
    n, size = keys.shape
    Q = torch.eye(size, dtype=torch.float64, device=keys.device)
    R = torch.zeros(values.shape[1], size, dtype=torch.float64, device=keys.device)
    centred = centred_keys(keys, mean)
    squared = (centred * centred).sum(-1)
    scale = keys.abs().amax(-1).pow(2).clamp_min(1e-300)
    for i in range(n):
        beta = float(betas[i])
        if beta == 0.0 or not float(squared[i]) > 1e-12 * float(scale[i]):
            continue
        a = centred[i] / squared[i]
        Q -= beta * torch.outer(Q @ keys[i], a)
        R += beta * torch.outer(values[i] - R @ keys[i], a)
    return Q, R


def memory_held_bytes(rule: HebbianPlasticity) -> int:
    """Bytes the rule keeps between forward passes: the anchors, the weights as it left them, the statistics and
    (delta rule) the running key mean."""
    held = sum(a.numel() * a.element_size() for a in [*rule.anchors.values(), *rule._written.values()])
    held += sum(k.numel() * k.element_size() for k in rule.key_sums.values())
    return held + rule._stats.numel() * rule._stats.element_size()


__all__ = [
    "HebbianPlasticity",
    "HebbianPlasticityObserver",
    "PlasticityConfig",
    "centred_keys",
    "delta_write_map",
    "memory_held_bytes",
]


# ----------------------------------------------------------------------------------------------------------------------
# When the rule runs inside a Trainer.
# ----------------------------------------------------------------------------------------------------------------------


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over every process of the default group (identity with one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


class HebbianPlasticityCallback(TrainerCallback):
    """Applies the Hebbian rule (`HebbianPlasticity`) every `every_n_steps` optimizer steps, from the statistics the
    training forward passes gathered since the last edit (evaluation passes gather nothing). Under several processes
    the statistics are summed over all ranks first, so every rank applies the same edit and the replicas stay
    bit-identical. Its state (anchors, pending statistics, counters) is written next to each Trainer checkpoint as
    `hebbian_plasticity.safetensors` + `hebbian_plasticity.json` and read back when training resumes from it.

        trainer = CTMTrainer(model=model, args=args, train_dataset=data,
                             callbacks=[HebbianPlasticityCallback(PlasticityConfig(), every_n_steps=10)])
    """

    state_name = "hebbian_plasticity"

    def __init__(self, config: PlasticityConfig | None = None, every_n_steps: int = 10):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
        self.config = config if config is not None else PlasticityConfig()
        if not isinstance(self.config, PlasticityConfig):
            raise TypeError(f"config must be a PlasticityConfig, got {type(self.config).__name__}.")
        self.every_n_steps = every_n_steps
        self.rule: HebbianPlasticity | None = None
        self.last_report: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.config.rule == "delta" and args.world_size > 1:
            # the delta rule's statistics are an ordered composition of writes, which a sum over ranks is not
            raise ValueError(
                f"PlasticityConfig.rule='delta' runs in one process only, got world_size={args.world_size}: "
                "its pending writes compose in order and cannot be summed across ranks."
            )
        if self.rule is None:
            self.rule = HebbianPlasticity(model, self.config)
            self.rule.gather_in_eval_mode = False
        if state.global_step > 0:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if (folder / f"{self.state_name}.json").is_file():
                self.load(folder, with_statistics=args.process_index == 0)
        self.rule.enable()

    def on_step_end(self, args, state, control, **kwargs):
        if self.rule is None or state.global_step % self.every_n_steps != 0:
            return
        statistics = _all_reduce_sum(self.rule.statistics().to(args.device)).cpu()
        self.last_report = self.rule.apply(statistics)

    def on_save(self, args, state, control, **kwargs):
        if self.rule is None:
            return
        # the pending statistics are per rank: save their sum (every rank takes part in the reduction), and on
        # resume give it back to rank 0 only, so the next edit sees every token exactly once
        pending = _all_reduce_sum(self.rule.statistics().to(args.device)).cpu()
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.save(folder, pending)

    def on_train_end(self, args, state, control, **kwargs):
        if self.rule is not None:
            self.rule.disable()

    def save(self, folder: str | os.PathLike, pending: torch.Tensor | None = None) -> None:
        folder = Path(folder)
        tensors, meta = self.rule.state()
        if pending is not None:
            tensors["statistics"] = pending
        meta["every_n_steps"] = self.every_n_steps
        atomic_write(folder / f"{self.state_name}.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write(folder / f"{self.state_name}.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))

    def load(self, folder: str | os.PathLike, with_statistics: bool = True) -> None:
        folder = Path(folder)
        meta = json.loads((folder / f"{self.state_name}.json").read_text())
        saved = PlasticityConfig.from_dict(meta["config"])
        if saved != self.config:
            raise ValueError(
                f"the checkpoint's plasticity config {saved.to_dict()} differs from this callback's "
                f"{self.config.to_dict()}; resume with the same PlasticityConfig."
            )
        tensors = load_file(str(folder / f"{self.state_name}.safetensors"))
        if not with_statistics:
            tensors.pop("statistics", None)
        self.rule.load_state(tensors, meta)




SLEEP_STATE = "sleep_state"  # <checkpoint>/sleep_state.safetensors + sleep_state.json
