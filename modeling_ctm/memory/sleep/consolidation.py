# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Consolidation: a few optimizer steps on the replayed sequences, each token weighted (`token_weights`), with one
persistent AdamW for the whole run (`Consolidator`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ...loss_ctm import next_token_labels
from .replay import _check_choice


WEIGHTINGS = ("hard", "uniform", "training_loss", "certainty_correct")


@dataclass
class ConsolidationConfig:
    """How a sleep consolidates. `weighting` (see the module docstring), `steps` optimizer steps per sleep on the one
    replay batch, AdamW with `lr`, `betas`, no weight decay, gradient norm clipped at `max_grad_norm`; token weights
    capped at `max_weight` times the mean ("hard")."""

    weighting: str = "hard"
    steps: int = 2
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    max_weight: float = 4.0

    def __post_init__(self):
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps={self.steps!r} is invalid: allowed values are integers >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: allowed values are floats > 0")
        self.betas = tuple(self.betas)


def token_weights(token_ce: torch.Tensor, labelled: torch.Tensor, weighting: str, max_weight: float = 4.0, logits=None,
                  targets=None) -> torch.Tensor:  # fmt: skip
    """Detached per-token weights (B, T) of a consolidation loss; 0 on unlabelled positions."""
    labelled = labelled.float()
    with torch.no_grad():
        if weighting == "uniform" or weighting == "training_loss":
            weights = labelled
        elif weighting == "hard":
            mean = (token_ce * labelled).sum() / labelled.sum().clamp(min=1)
            weights = (token_ce / mean.clamp(min=1e-8)).clamp(max=max_weight) * labelled
            weights = weights * labelled.sum() / weights.sum().clamp(min=1e-8)
        else:  # "certainty_correct": the reference's c_t * [argmax_t == y_t], normalised to sum N
            log_probs = F.log_softmax(logits.float(), -1)
            certainty = 1 - (-(log_probs.exp() * log_probs).sum(-1)) / math.log(logits.shape[-1])
            correct = (logits.argmax(-1) == targets).float()
            weights = certainty.clamp(0, 1) * correct * labelled
            weights = weights / (weights.sum() + 1e-8) * labelled.sum()
    return weights


class Consolidator:
    """Consolidation with its own persistent AdamW over the parameters that require a gradient when it is built (the
    ones the trainer trains). `state_dict()` gives (tensors, JSON) for a checkpoint."""

    def __init__(self, model, config: ConsolidationConfig | None = None):
        self.config = config or ConsolidationConfig()
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("Consolidator needs a model with at least one parameter that requires a gradient")
        params = dict(model.named_parameters())
        self.params = [params[name] for name in self.names]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, betas=self.config.betas, weight_decay=0.0)

    def loss(self, model, input_ids, labels, attention_mask) -> torch.Tensor:
        """The consolidation loss of one batch (with gradient)."""
        if self.config.weighting == "training_loss":
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        targets = next_token_labels(labels)
        labelled = targets != -100
        safe = torch.where(labelled, targets, 0)
        token_ce = F.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none") * labelled
        weights = token_weights(token_ce.detach(), labelled, self.config.weighting, self.config.max_weight,
                                logits.detach(), safe)  # fmt: skip
        return (token_ce * weights).sum() / labelled.sum().clamp(min=1)

    def consolidate(self, model, input_ids, labels, attention_mask) -> list[float]:
        """`config.steps` optimizer steps on one replay batch; returns the loss before each step."""
        was_training = model.training
        model.train()
        device = next(model.parameters()).device
        input_ids, labels, attention_mask = input_ids.to(device), labels.to(device), attention_mask.to(device)
        losses = []
        for _ in range(self.config.steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(model, input_ids, labels, attention_mask)
            loss.backward()
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)  # the trainer's next step must start from clean gradients
        model.train(was_training)
        return losses

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        state = self.optimizer.state_dict()
        tensors, per_param = {}, {}
        for index, slots in state["state"].items():
            per_param[str(index)] = {}
            for key, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().clone().contiguous()
                else:
                    per_param[str(index)][key] = value
        meta = {"config": asdict(self.config), "names": self.names, "param_groups": state["param_groups"],
                "scalars": per_param}  # fmt: skip
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["names"] != self.names:
            raise ValueError("the checkpointed consolidation optimizer covers other parameters than this model's")
        state = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.clone()
        for index, scalars in meta["scalars"].items():
            state.setdefault(int(index), {}).update(scalars)
        groups = [{**group, "betas": tuple(group["betas"])} for group in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

