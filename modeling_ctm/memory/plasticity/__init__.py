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

Where each part lives: `config` (`PlasticityConfig`, what an edit may do), `observer` (the statistics gathered during
the ticks), `rule` (`HebbianPlasticity`: the switch, the anchors, the Hebbian/Oja reading and the edit), `delta` (the
delta rule's reading, its affine write map and the token-memory writes), `homeostasis` (the step cap, the drift bound
and the norm band), `persistence` (the rule's state as tensors + JSON) and `callback` (the rule inside a Trainer).
"""

from .callback import HebbianPlasticityCallback
from .config import (
    DELTA_PRESYNAPTIC_CHOICES,
    DELTA_STEP_CHOICES,
    DELTA_TARGET_CHOICES,
    GATE_CHOICES,
    PRESYNAPTIC_CHOICES,
    RULE_CHOICES,
    TARGET_CHOICES,
    PlasticityConfig,
)
from .delta import centred_keys, delta_write_map
from .observer import HebbianPlasticityObserver
from .rule import HebbianPlasticity, memory_held_bytes


__all__ = [
    "DELTA_PRESYNAPTIC_CHOICES",
    "DELTA_STEP_CHOICES",
    "DELTA_TARGET_CHOICES",
    "GATE_CHOICES",
    "PRESYNAPTIC_CHOICES",
    "RULE_CHOICES",
    "TARGET_CHOICES",
    "HebbianPlasticity",
    "HebbianPlasticityCallback",
    "HebbianPlasticityObserver",
    "PlasticityConfig",
    "centred_keys",
    "delta_write_map",
    "memory_held_bytes",
]
