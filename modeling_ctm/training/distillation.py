"""Distillation from the base: KL(teacher's next-token distribution || the model's), plus or instead of the LM loss.

The teacher is frozen, so its distribution is cached with the frozen trunk (`trunk_cache.TrunkCache`): either full
(V log-probabilities per token) or its top k. With top k the KL is taken over k + 1 outcomes: the k tokens and "any
other token" (whose probability is 1 minus the top-k mass, for the teacher and for the model alike). That is a true
KL of a coarse-grained pair of distributions: zero exactly when the model equals the teacher (at phase 2's exact
start with `ctm_mlp="keep"`), never above the full KL, and it needs only k + 1 numbers per token from the cache.
"""

from dataclasses import dataclass

import torch


@dataclass
class DistillationConfig:
    """The loss mix of a trunk-cached training step: `lm_weight` x the LM loss + `kl_weight` x KL(teacher || model).

    Args:
        lm_weight (`float`, defaults to 1.0): weight of the model's own LM loss (0 turns it off).
        kl_weight (`float`, defaults to 0.0): weight of the distillation KL (needs a cache built with a teacher).
    """

    lm_weight: float = 1.0
    kl_weight: float = 0.0

    def __post_init__(self):
        for field in ("lm_weight", "kl_weight"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"distillation.{field}={value!r} is invalid: allowed values are floats >= 0")
        if self.lm_weight == 0 and self.kl_weight == 0:
            raise ValueError("distillation.lm_weight and distillation.kl_weight are both 0: nothing would be trained")


def _log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p <= 0, stable near both ends; the mass is clamped above 0 (a top-k that holds
    all the mass up to rounding leaves a tiny "other" outcome rather than log 0)."""
    log_p = log_p.clamp(max=-1e-7)
    return torch.where(log_p > -0.6931, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def distillation_kl(
    logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """KL(teacher || model) per predicted token, over positions 0..T-2 (those with a next token, as the LM loss).

    logits (B, T, V): the model's. teacher_log_probs: (B, T, V) full log-probabilities, or (B, T, k) the top k with
    `teacher_ids` (B, T, k) their token ids. Summed over tokens and divided by `num_items_in_batch` when given (what
    the Trainer counts across gradient accumulation), else by the number of tokens."""
    if teacher_log_probs.shape[:2] != logits.shape[:2]:
        raise ValueError(f"teacher_log_probs {tuple(teacher_log_probs.shape)} does not match logits "
                         f"{tuple(logits.shape)} in (batch, sequence)")  # fmt: skip
    log_q = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    log_p = teacher_log_probs[:, :-1].float().to(log_q.device)
    if teacher_ids is None:
        if log_p.shape[-1] != log_q.shape[-1]:
            raise ValueError(f"full teacher_log_probs have {log_p.shape[-1]} classes, the model {log_q.shape[-1]}")
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        log_q_top = log_q.gather(-1, teacher_ids[:, :-1].to(log_q.device))
        log_p_rest = _log1mexp(torch.logsumexp(log_p, dim=-1))
        log_q_rest = _log1mexp(torch.logsumexp(log_q_top, dim=-1))
        per_token = (log_p.exp() * (log_p - log_q_top)).sum(-1) + log_p_rest.exp() * (log_p_rest - log_q_rest)
    total = per_token.sum()
    count = num_items_in_batch if num_items_in_batch is not None else per_token.numel()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count
