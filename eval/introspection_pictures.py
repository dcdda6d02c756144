"""The pictures of eval/introspection.py: the reliability diagram, the halting curve against fixed K' < K, and the
fMRI gallery of the easiest and hardest held-out tokens (`fmri.draw_thinking_map`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from modeling_ctm.fmri import draw_thinking_map, save_figure, summarize_probe


def draw_reliability(tables: dict[str, tuple[float, list[dict]]], path: Path) -> Path:
    figure = Figure(figsize=(5.2, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (ece, table) in tables.items():
        ax.plot([row["confidence"] for row in table], [row["accuracy"] for row in table], marker="o",
                label=f"{name} (ECE {ece:.3f})")  # fmt: skip
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Reliability on held-out text (first seed)", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def draw_curves(halting: list[dict], fixed: list[dict], path: Path) -> Path:
    figure = Figure(figsize=(5.2, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot([p["tick_flops_saved"] for p in halting], [p["delta_ce"] for p in halting], marker="o",
            label="halting on sync convergence")  # fmt: skip
    ax.plot([p["tick_flops_saved"] for p in fixed], [p["delta_ce"] for p in fixed], marker="s",
            label="fixed K' < K (every token)")  # fmt: skip
    ax.axhline(0.02, color="grey", linestyle="--", linewidth=1, label="0.02 nats/token")
    ax.axvline(0.30, color="grey", linestyle=":", linewidth=1, label="30 % saved")
    ax.set_xlabel("tick FLOPs saved (share)")
    ax.set_ylabel("Δ CE vs all K ticks (nats/token)")
    ax.legend(fontsize=8)
    return save_figure(figure, path)


@torch.no_grad()
def draw_gallery(model, ids, tokenizer, settings, out: Path) -> list[str]:
    block = ids[: min(len(ids), 8)]
    outputs, layers = model.probe(block)
    log_probs = F.log_softmax(outputs.logits.float(), dim=-1)[:, :-1]
    ce = -log_probs.gather(-1, block[:, 1:, None])[..., 0]
    flat = ce.flatten()
    order = flat.argsort()
    B, T = block.shape
    paths = []

    def token_mask(indices):
        mask = torch.zeros(B, T)
        for index in indices.tolist():
            mask[index // (T - 1), index % (T - 1)] = 1
        return mask

    n = settings.gallery_tokens
    for kind, picked in (("easy", order[:n]), ("hard", order.flip(0)[:n])):
        for rank, index in enumerate(picked.tolist()):
            row, col = index // (T - 1), index % (T - 1)
            context = tokenizer.decode(block[row, max(0, col - 6) : col + 1]).replace("\n", " ")
            target = tokenizer.decode(block[row, col + 1 : col + 2]).replace("\n", " ")
            title = f"{kind} token: ...{context!r} -> {target!r} (CE {flat[index]:.2f} nats)"
            path = out / f"fmri_{kind}_{rank}.png"
            paths.append(
                str(draw_thinking_map(summarize_probe(layers, token_mask(torch.tensor([index]))), path, title))
            )
        decile = max(1, len(flat) // 10)
        group = order[:decile] if kind == "easy" else order.flip(0)[:decile]
        title = f"{kind}est 10% of {len(flat)} held-out tokens (mean CE {flat[group].mean():.2f} nats)"
        paths.append(str(draw_thinking_map(summarize_probe(layers, token_mask(group)), out / f"fmri_{kind}_group.png",
                                           title)))  # fmt: skip
    return paths
