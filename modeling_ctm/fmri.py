"""The "fMRI" of the thinking: per layer and tick summaries of `model.probe` and their heatmap picture.

The shared contract: `summarize_probe(layers, token_mask)` -> {"state_delta", "certainty", "sync_change": arrays
(n_layers, K) of means over real tokens, "layers": [layer indices]}; `draw_thinking_map(summary, path, title)` draws
one heatmap panel per metric (layers x ticks) into a PNG, written atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


METRICS = ("state_delta", "certainty", "sync_change")


def _token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    """(B, T, K) -> (K,) mean over the real tokens."""
    values = values.float()
    if mask is None:
        return values.mean((0, 1)).cpu().numpy()
    weights = mask.to(values.device).float()[..., None]
    return ((values * weights).sum((0, 1)) / weights.sum((0, 1)).clamp(min=1)).cpu().numpy()


def summarize_probe(layers: dict, token_mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Means over real tokens (`token_mask` (B, T), 1 = real) of each probed layer's per-tick state change, logit-lens
    certainty and readout-synchronisation change ||S_out,k - S_out,k-1|| (k = 0 against the synchronisation the token
    entered with, when the probe carries it as `sync_entry` (B, T, S); NaN otherwise)."""
    if not layers:
        raise ValueError("summarize_probe needs at least one probed layer (the model has no thinking layers?)")
    indices = sorted(layers)
    rows = {name: [] for name in METRICS}
    for index in indices:
        probe = layers[index]
        rows["state_delta"].append(_token_mean(probe.state_delta, token_mask))
        if probe.certainty is not None:
            rows["certainty"].append(_token_mean(probe.certainty, token_mask))
        else:
            rows["certainty"].append(np.full(probe.state_delta.shape[-1], np.nan))
        sync = probe.sync_out.float()  # (B, T, K, S)
        change = torch.zeros(sync.shape[:3], device=sync.device)
        change[..., 1:] = (sync[:, :, 1:] - sync[:, :, :-1]).norm(dim=-1)
        entry = getattr(probe, "sync_entry", None)
        if entry is not None:
            change[..., 0] = (sync[:, :, 0] - entry.to(sync.device).float()).norm(dim=-1)
        else:
            change[..., 0] = float("nan")
        rows["sync_change"].append(_token_mean(change, token_mask))
    summary = {name: np.stack(values).astype(np.float64) for name, values in rows.items()}
    summary["layers"] = indices
    return summary


def draw_thinking_map(summary: dict, path, title: str | None = None) -> Path:
    """One heatmap panel per metric (rows: layers, columns: ticks), annotated with the values; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    metrics = [name for name in METRICS if name in summary]
    if not metrics:
        raise ValueError(f"summary has none of the metrics {list(METRICS)}: keys {sorted(summary)}")
    layers = summary.get("layers", list(range(np.asarray(summary[metrics[0]]).shape[0])))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 0.7 * len(layers) + 1.8), squeeze=False)
    for ax, name in zip(axes[0], metrics):
        values = np.asarray(summary[name], dtype=np.float64)
        image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("tick")
        ax.set_ylabel("layer")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]), [str(layer) for layer in layers])
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color="cyan")
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
