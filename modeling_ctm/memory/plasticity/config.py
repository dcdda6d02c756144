# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""What a Hebbian edit is allowed to do: `PlasticityConfig`, every field checked, and the allowed values."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


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
