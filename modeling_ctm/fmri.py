"""fMRI pictures of a probe: per thinking layer and tick, how much the state moved, how certain the logit lens is and
how far the readout synchronisation travelled.

`summarize_probe` reduces `model.probe(...)`'s per-token records to (n_layers, K) means over the real tokens;
`draw_thinking_map` draws those means as one heatmap panel per metric (layers x ticks) into a PNG. Probe users,
evaluation (`eval/introspection.py`) and the sleep dream diagnostics share this one picture.
"""

import os
import pathlib

import numpy
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io_ctm import atomic_write
from .observers_ctm import METRICS, summarize_probe, sync_change


_TITLES = {
    "state_delta": "state change ||z_k - z_(k-1)||",
    "certainty": "certainty (logit lens)",
    "sync_change": "sync change ||S_k - S_(k-1)||",
}


def draw_thinking_map(summary: dict, path: str | os.PathLike, title: str | None = None) -> pathlib.Path:
    """One heatmap panel per metric (rows: layers, columns: ticks) with the value written in each cell, saved as a
    PNG at `path` (written to a temporary file and renamed into place). Returns the path."""
    missing = [name for name in (*METRICS, "layers") if name not in summary]
    if missing:
        raise ValueError(f"summary is missing {missing}; build it with summarize_probe")
    path = pathlib.Path(path)
    layer_names = [str(i) for i in summary["layers"]]
    n_layers, K = numpy.asarray(summary["state_delta"]).shape
    figure = Figure(figsize=(3.2 * len(METRICS) + 0.6, 0.5 * n_layers + 1.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(METRICS))
    for ax, name in zip(axes, METRICS):
        values = numpy.asarray(summary[name], dtype=float)
        image = ax.imshow(values, aspect="auto", cmap="magma" if name != "certainty" else "viridis")
        ax.set_title(_TITLES[name], fontsize=9)
        ax.set_xlabel("tick")
        ax.set_xticks(range(K))
        ax.set_yticks(range(n_layers), layer_names)
        ax.set_ylabel("layer")
        low, high = image.get_clim()
        for layer in range(n_layers):
            for tick in range(K):
                value = values[layer, tick]
                if numpy.isfinite(value):
                    bright = high > low and (value - low) / (high - low) > 0.6  # dark text on the bright end
                    ax.text(
                        tick, layer, f"{value:.3g}", ha="center", va="center", fontsize=7, color="k" if bright else "w"
                    )
        figure.colorbar(image, ax=ax, shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def save_figure(figure, path: str | os.PathLike) -> pathlib.Path:
    """Write a matplotlib `Figure` as a PNG through the package's one atomic write."""
    path = pathlib.Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    return path


__all__ = ["METRICS", "draw_thinking_map", "summarize_probe", "sync_change"]
