# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The multi-tick loss: per token, CE at the lowest-loss tick and at the most-certain tick (plus optional per-tick and
mixture terms), the certainty it picks by, and the readouts' names reported side by side.

Travels with checkpoints as remote code (imported by `modeling_ctm.py`)."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t holds the label of t + 1 (the last is ignored)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def tick_certainty(tick_logits: torch.Tensor | None = None, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """1 - H(softmax(logits)) / log V, in float32, without gradient. (..., V) -> (...). Pass `log_probs` when they
    are already computed (the loss needs them too) to skip a second softmax over the vocabulary."""
    with torch.no_grad():
        if log_probs is None:
            log_probs = F.log_softmax(tick_logits.float(), dim=-1)
        log_probs = log_probs.detach()
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return 1.0 - entropy / math.log(log_probs.shape[-1])


# The readouts' mean CE, reported side by side by the model, the trainers and the main job.
READOUT_LOSSES = ("loss_final_tick", "loss_most_certain_tick", "loss_argmin_tick", "loss_tick_mixture")


@dataclass
class MultiTickLoss:
    loss: torch.Tensor
    tick_losses: torch.Tensor
    tick_argmin_fraction: torch.Tensor
    loss_final_tick: torch.Tensor
    loss_most_certain_tick: torch.Tensor
    loss_argmin_tick: torch.Tensor
    loss_tick_mixture: torch.Tensor


def multi_tick_loss(
    tick_log_probs: torch.Tensor,
    certainty: torch.Tensor,
    labels: torch.Tensor | None,
    argmin_weight: float,
    certain_weight: float,
    tick_aux_weight: float,
    shift_labels: torch.Tensor | None = None,
    mixture_weight: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    **kwargs,
) -> MultiTickLoss:
    """Per token: argmin_weight * CE at the lowest-loss tick + certain_weight * CE at the most-certain tick +
    tick_aux_weight * mean CE over ticks + mixture_weight * CE of the mean of the ticks' distributions; summed over tokens and divided by `num_items_in_batch` (or the number of
    labelled tokens), like `ForCausalLMLoss`. `tick_log_probs` (B, T, K, V) float32 log-softmax of every tick's logits,
    `certainty` (B, T, K)."""
    if shift_labels is None:
        shift_labels = next_token_labels(labels, ignore_index)
    shift_labels = shift_labels.to(tick_log_probs.device)
    B, T, K, V = tick_log_probs.shape
    labelled = shift_labels != ignore_index
    # gather along the vocabulary (last) dim: no permuted copy of the K-fold logits
    targets = torch.where(labelled, shift_labels, 0)[..., None, None].expand(B, T, K, 1)
    token_tick_ce = -tick_log_probs.gather(-1, targets)[..., 0] * labelled[..., None]  # (B, T, K)
    argmin_tick = token_tick_ce.detach().argmin(-1, keepdim=True)
    certain_tick = certainty.argmax(-1, keepdim=True)
    ce_argmin = token_tick_ce.gather(-1, argmin_tick)[..., 0]
    ce_certain = token_tick_ce.gather(-1, certain_tick)[..., 0]
    per_token = argmin_weight * ce_argmin + certain_weight * ce_certain
    if tick_aux_weight:
        per_token = per_token + tick_aux_weight * token_tick_ce.mean(-1)
    # CE of the mean of the K distributions (the "tick_mixture" readout); unlabelled tokens give log K - log K = 0
    mixture_ce = math.log(K) - torch.logsumexp(-token_tick_ce, dim=-1)
    if mixture_weight:
        per_token = per_token + mixture_weight * mixture_ce
    n_labelled = labelled.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else n_labelled
    if torch.is_tensor(denominator):
        denominator = denominator.to(per_token.device)
    loss = (per_token * labelled).sum() / denominator

    with torch.no_grad():
        count = n_labelled.clamp(min=1)
        weights = labelled.float()
        tick_losses = (token_tick_ce * weights[..., None]).sum((0, 1)) / count
        argmin_fraction = (F.one_hot(argmin_tick[..., 0], K).float() * weights[..., None]).sum((0, 1)) / count
        return MultiTickLoss(
            loss=loss,
            tick_losses=tick_losses,
            tick_argmin_fraction=argmin_fraction,
            loss_final_tick=tick_losses[-1],
            loss_most_certain_tick=(ce_certain * weights).sum() / count,
            loss_argmin_tick=(ce_argmin * weights).sum() / count,
            loss_tick_mixture=(mixture_ce.detach() * weights).sum() / count,
        )


def sequence_loss_sums(logits: torch.Tensor, labels=None, shift_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed CE of the readout `logits` (B, T, V) over labelled tokens, and their count; (B,) each,
    float32, without gradient. What a sequence's difficulty means everywhere (the sleep heap's key)."""
    with torch.no_grad():
        if shift_labels is None:
            shift_labels = next_token_labels(labels)
        shift_labels = shift_labels.to(logits.device)
        labelled = shift_labels != -100
        targets = torch.where(labelled, shift_labels, 0)
        token_ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none") * labelled
        return token_ce.sum(-1), labelled.sum(-1).float()
