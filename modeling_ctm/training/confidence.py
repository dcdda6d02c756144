"""Fitting the confidence head (`modeling_ctm.confidence_ctm`) on frozen features with a Brier loss.

The model is frozen: its features are computed once (`token_confidence`), and only the head's F + 1 numbers are fitted,
full batch, by L-BFGS on the mean squared error between the head's P(right) and the 0/1 outcome (the Brier score, a
proper scoring rule: it is minimised by the true probability, so the fitted head is calibrated on its training
distribution, not merely ranked)."""

from __future__ import annotations

import torch

from ..confidence_ctm import CTMConfidenceHead


def fit_confidence_head(
    head: CTMConfidenceHead, features: torch.Tensor, correct: torch.Tensor, l2: float = 1e-4, max_iter: int = 200
) -> dict[str, float]:
    """Fit `head` in place on `features` (N, F) and `correct` (N,) in {0, 1}. The features are standardised for the
    fit and the scaling folded back into the head's weights, so the head reads raw features. Returns the training
    Brier score before (a fresh head: 0.5 everywhere) and after."""
    features = features.detach().float().reshape(-1, features.shape[-1])
    correct = correct.detach().float().reshape(-1)
    if features.shape[-1] != head.weight.numel():
        raise ValueError(
            f"features has {features.shape[-1]} columns, the head reads {head.weight.numel()}: {head.feature_names}"
        )
    if len(features) != len(correct) or len(correct) == 0:
        raise ValueError(f"features ({len(features)} rows) and correct ({len(correct)}) must be equally long, > 0")
    if not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError("correct must hold 0 or 1 only")
    mean, scale = features.mean(0), features.std(0).clamp_min(1e-6)
    standard = (features - mean) / scale
    weight = torch.zeros(standard.shape[1], requires_grad=True)
    bias = torch.logit(correct.mean().clamp(1e-3, 1 - 1e-3)).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def brier() -> torch.Tensor:
        return ((torch.sigmoid(standard @ weight + bias) - correct) ** 2).mean()

    def closure():
        optimizer.zero_grad()
        loss = brier() + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    before = float(((0.5 - correct) ** 2).mean())
    optimizer.step(closure)
    with torch.no_grad():
        head.weight.copy_((weight / scale).to(head.weight.dtype))
        head.bias.copy_((bias - (weight * mean / scale).sum()).to(head.bias.dtype))
        after = float(((head(features) - correct) ** 2).mean())
    return {"brier_before": before, "brier_after": after}
