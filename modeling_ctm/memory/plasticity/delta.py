# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The delta rule (`PlasticityConfig(rule="delta")`): its reading of a forward pass (keys, values and steps in
order, composed into one affine map of the memory), the map itself (`delta_write_map`, `centred_keys`), and the
token-memory writes (`targets=["token_memory"]`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DeltaRuleReading:
    """The delta rule's part of `HebbianPlasticity` (a mixin: it reads and writes the rule's statistics)."""

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
