# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Homeostasis: what bounds the rule's own edit. Each step is capped at `max_step` and the accumulated edit at
`max_drift` times the anchor's norm (slot by slot for a token memory), and the stored weights stay inside the norm band
around the anchor. Against the anchor, never the previous edit, so nothing compounds."""

from __future__ import annotations

import math

import torch

from .observer import _Target


class Homeostasis:
    """The bounded edit of `HebbianPlasticity` (a mixin: it reads the rule's anchors, targets and config)."""

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

