# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The block-health gauge: is a thinking block awake? Measured from outside, with forward hooks and a tick
observer, so the forward it measures is the one that runs everywhere else."""

import torch

from .cache_ctm import read_synchronisation
from .observers_ctm import CTMTickObserver


GAUGE_FIELDS = ("block_to_residual", "block_to_mlp", "sync_variation", "entry_share")  # the per-layer scalars


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0.0 else numerator / denominator


class _GaugeObserver(CTMTickObserver):
    """Per thinking layer: the final S_out of every real token, the entry state's share of its accumulator, and how
    much the readout moved from tick to tick. One step's ticks arrive in order, steps one after another."""

    def __init__(self):
        self.sync = {}  # layer -> list of (n, S) final S_out of real tokens
        self.entry_share = {}  # layer -> list of (n,) shares
        self.tick_change = {}  # layer -> {tick: list of (n,) ||y_k - y_{k-1}|| / ||y_k||}
        self._pending = {}  # layer -> the step in flight

    def _finish(self, layer: int) -> None:
        step = self._pending.pop(layer, None)
        if step is None:
            return
        valid, entry_alpha, rate, last = step["valid"], step["entry_alpha"], step["rate"], step["last"]
        self.sync.setdefault(layer, []).append(read_synchronisation(last.alpha_out, last.beta_out)[valid])
        # the entry numerator decays by r once per tick; its share of the final numerator is what the ticks never
        # overwrote (with carry "none" the entry state is the learned start state)
        seeded = entry_alpha * rate ** step["ticks"]
        share = seeded.norm(dim=-1) / last.alpha_out.float().norm(dim=-1).clamp_min(1e-30)
        self.entry_share.setdefault(layer, []).append(share[valid])

    def on_tick(self, event) -> None:
        layer = event.layer_idx
        with torch.no_grad():
            readout = event.block.readout(event.after).float()
            if event.tick == 0:
                self._finish(layer)
                self._pending[layer] = {
                    "valid": event.valid,
                    "entry_alpha": event.before.alpha_out.float(),
                    "rate": event.block.sync_out.decay_rates().float(),
                    "ticks": 0,
                    "previous": event.block.readout(event.before).float(),
                }
            step = self._pending[layer]
            change = (readout - step["previous"]).norm(dim=-1) / readout.norm(dim=-1).clamp_min(1e-30)
            self.tick_change.setdefault(layer, {}).setdefault(event.tick, []).append(change[event.valid])
            step["previous"], step["last"], step["ticks"] = readout, event.after, step["ticks"] + 1

    def on_layer(self, event) -> None:
        self._finish(event.layer_idx)


@torch.no_grad()
def block_health(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """How awake each thinking layer of `model` (a `CTMForCausalLM`) is on `input_ids` (B, T). Returns
    `{"layers": {layer_idx: {...}}, "tick_ce": [...], "served_ce": float, "objective": float}` where per layer (norms are per real token,
    averaged over tokens):

    - `block_to_residual`: ||block output|| / ||residual entering the layer||
    - `block_to_mlp`: ||block output|| / ||kept MLP output|| (None with `ctm_mlp="replace"`)
    - `sync_variation`: ||S - mean S|| / ||mean S|| of the final S_out across tokens (0: the readout sees one vector)
    - `entry_share`: ||r^K alpha_entry|| / ||alpha_final||, the entry state's share of the S_out accumulator (the
      learned start state with carry "none"; near 1: the ticks barely register)
    - `tick_change`: per tick, mean ||y_k - y_{k-1}|| / ||y_k|| of the block's readout (tick 0 against the entry state)

    and `tick_ce` the mean next-token CE of each tick's logits. `served_ce` is the CE of the logits the model serves
    (`model(...).logits`, the `ctm_readout` the config chose) on the real next tokens; `objective` is the training loss
    (`output.loss`: the readout terms the config weights plus the per-tick auxiliary term), which is not a CE of
    anything served and can sit well above both."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    layers = [layer for layer in model.model.layers if layer.is_thinking]
    norms = {layer.layer_idx: {"residual": [], "mlp": []} for layer in layers}
    hooks = []
    for layer in layers:

        def before(module, args, kwargs, idx=layer.layer_idx):
            hidden = args[0] if args else kwargs["hidden_states"]
            norms[idx]["residual"].append(hidden.float().norm(dim=-1)[real].mean().item())

        hooks.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        if layer.mlp is not None:

            def after_mlp(module, args, output, idx=layer.layer_idx):
                norms[idx]["mlp"].append(output.float().norm(dim=-1)[real].mean().item())

            hooks.append(layer.mlp.register_forward_hook(after_mlp))

    class _Outputs(CTMTickObserver):
        def on_layer(self, event):
            norms[event.layer_idx].setdefault("block", []).append(
                event.output.float().norm(dim=-1)[real].mean().item()
            )

    gauge = _GaugeObserver()
    labels = input_ids.masked_fill(~real, -100)
    was_training = model.training
    model.eval()
    try:
        with model.observing(gauge, _Outputs()):
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    report = {}
    for layer in layers:
        idx = layer.layer_idx
        block = sum(norms[idx]["block"]) / len(norms[idx]["block"])
        residual = sum(norms[idx]["residual"]) / len(norms[idx]["residual"])
        mlp = sum(norms[idx]["mlp"]) / len(norms[idx]["mlp"]) if norms[idx]["mlp"] else None
        sync = torch.cat(gauge.sync[idx])
        mean = sync.mean(dim=0)
        variation = _ratio((sync - mean).norm(dim=-1).mean().item(), mean.norm().item())
        report[idx] = {
            "block_to_residual": _ratio(block, residual),
            "block_to_mlp": None if mlp is None else _ratio(block, mlp),
            "sync_variation": variation,
            "entry_share": torch.cat(gauge.entry_share[idx]).mean().item(),
            "tick_change": [torch.cat(v).mean().item() for _, v in sorted(gauge.tick_change[idx].items())],
        }
    tick_losses = getattr(output, "tick_losses", None)
    targets = labels[:, 1:]
    log_probs = output.logits[:, :-1].float().log_softmax(dim=-1)
    real_targets = targets != -100
    token_ce = -log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return {
        "layers": report,
        "tick_ce": [] if tick_losses is None else [float(x) for x in tick_losses],
        "served_ce": float(token_ce[real_targets].mean()),
        "objective": float(output.loss),
    }


class _CarryObserver(CTMTickObserver):
    """Per thinking layer and real token: the tick-0 sync convergence, and beta_out and ||S_out|| after its last
    tick. `offset` is the position of the current call's first column in the whole stream."""

    def __init__(self):
        self.offset = 0
        self.records = {}  # layer -> {"position", "tick0_convergence", "beta_out", "sync_norm"} lists of tensors

    def on_tick(self, event) -> None:
        layer = self.records.setdefault(
            event.layer_idx, {"position": [], "tick0_convergence": [], "beta_out": [], "sync_norm": []}
        )
        valid = event.valid
        if event.tick == 0:
            layer["position"].append(event.columns[valid] + self.offset)
            layer["tick0_convergence"].append(event.block.sync_convergence(event.before, event.after)[valid])
        if event.tick == event.block.ticks - 1:
            layer["beta_out"].append(event.after.beta_out.float().mean(dim=-1)[valid])
            sync = read_synchronisation(event.after.alpha_out, event.after.beta_out)
            layer["sync_norm"].append(sync.norm(dim=-1)[valid])


@torch.no_grad()
def carry_profile(model, input_ids: torch.Tensor, segment: int = 128) -> dict:
    """The carried thinking state along one long stream `input_ids` (1, T), fed in cached segments of `segment`
    tokens the way a long conversation is decoded. Returns `{layer_idx: {"position", "tick0_convergence",
    "beta_out", "sync_norm"}}`, each a (T,) float tensor in stream order: the tick-0 sync convergence of each token
    (how settled S_out already is when the token starts thinking; near 1 = the history decides), the mean beta_out
    and ||S_out|| after its last tick. With decay 0 (rate 1) beta grows by K per carried token without bound; a
    decay range above 0 bounds it by K / (1 - r)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: allowed is one stream, (1, T)")
    observer = _CarryObserver()
    was_training = model.training
    model.eval()
    cache = None
    try:
        with model.observing(observer):
            for start in range(0, input_ids.shape[1], segment):
                observer.offset = start
                out = model(input_ids=input_ids[:, start : start + segment], cache=cache, use_cache=True)
                cache = out.cache
    finally:
        model.train(was_training)
    profile = {}
    for idx, layer in observer.records.items():
        order = torch.cat(layer["position"]).argsort()
        profile[idx] = {key: torch.cat(values).float()[order] for key, values in layer.items()}
    return profile
