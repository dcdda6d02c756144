# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The rule bound to one model (`HebbianPlasticity`): the switch, the anchors the rule's own edit is measured from,
the flat statistics, the Hebbian/Oja reading, and the edit (`compute_deltas`, `apply`). The delta rule's reading, the
homeostasis and the persistence are its mixins, each in its own module; `memory_held_bytes` is the rule's cost."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...modeling_ctm import CTMForCausalLM
from ...observers_ctm import CTMOutputEvent
from .config import PlasticityConfig
from .delta import DeltaRuleReading
from .homeostasis import Homeostasis
from .observer import HebbianPlasticityObserver, _Target
from .persistence import RulePersistence


class HebbianPlasticity(DeltaRuleReading, Homeostasis, RulePersistence):
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


def memory_held_bytes(rule: HebbianPlasticity) -> int:
    """Bytes the rule keeps between forward passes: the anchors, the weights as it left them, the statistics and
    (delta rule) the running key mean."""
    held = sum(a.numel() * a.element_size() for a in [*rule.anchors.values(), *rule._written.values()])
    held += sum(k.numel() * k.element_size() for k in rule.key_sums.values())
    return held + rule._stats.numel() * rule._stats.element_size()
