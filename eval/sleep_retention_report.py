"""eval/sleep_retention.py's pictures and report: the retention matrices, the dream's fMRI across stages, the replay
heap's rotation, results.md and the verdict against the issue's goal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from harness import arms_table, format_mean_sd, mean_sd

from modeling_ctm.fmri import save_figure
from modeling_ctm.observers_ctm import METRICS as FMRI_METRICS


TABLE_METRICS = ("final_ce", "forgetting", "learned_ce", "wall_seconds")
EXTRA = ("sleep_loss_admission", "sleep_with_retirement", "sleep_forgotten")  # sleep's diagnostics, paired with it


def draw_retention(arms: dict, names: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.0 * len(arms), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, len(arms)))
    matrices = {arm: np.mean([np.asarray(R) for R in entry], axis=0) for arm, entry in arms.items()}
    low = min(m.min() for m in matrices.values())
    high = max(m.max() for m in matrices.values())
    for ax, (arm, R) in zip(axes, matrices.items()):
        image = ax.imshow(R, cmap="magma_r", vmin=low, vmax=high)
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if (R[i, j] - low) / max(high - low, 1e-9) > 0.5 else "k")  # fmt: skip
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("after stage j")
        ax.set_ylabel("CE on stage i")
        ax.set_xticks(range(len(names)))
        ax.set_yticks(range(len(names)))
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    figure.suptitle("retention matrix R[i, j] (held-out CE, mean over seeds)", fontsize=10)
    save_figure(figure, path)


def draw_fmri(fmri: list[dict], path: Path, title: str) -> None:
    """Per metric one heatmap: rows (layer, tick), columns the sleeps in order, stage boundaries marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmri = [f for f in fmri if f["dream"]]
    if not fmri:
        return
    layers = fmri[0]["dream"]["layers"]
    figure = Figure(figsize=(10, 1.6 * len(FMRI_METRICS) + 1), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(FMRI_METRICS), 1)
    boundaries = [k for k in range(1, len(fmri)) if fmri[k]["stage"] != fmri[k - 1]["stage"]]
    for ax, name in zip(axes, FMRI_METRICS):
        values = np.stack([np.asarray(f["dream"][name], dtype=float).reshape(-1) for f in fmri], axis=1)
        K = np.asarray(fmri[0]["dream"][name]).shape[1]
        image = ax.imshow(values, aspect="auto", cmap="viridis" if name == "certainty" else "magma",
                          interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(values.shape[0]), [f"L{layer} t{tick}" for layer in layers for tick in range(K)])
        for b in boundaries:
            ax.axvline(b - 0.5, color="w", lw=1.5)
        ax.set_title(name, fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.9)
    axes[-1].set_xlabel("sleep (white lines: a new stage begins)")
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def draw_rotation(rotations: dict[str, list[dict]], n_stages: int, path: Path, seed: int = 0) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rotations = {arm: r for arm, r in rotations.items() if r}
    if not rotations:
        return
    figure = Figure(figsize=(10, 1.8 * len(rotations) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(len(rotations), 1, sharex=True))
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"]
    for ax, (arm, rows) in zip(axes, rotations.items()):
        counts = np.asarray([r["replayed_from"] for r in rows], dtype=float)
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        bottom = np.zeros(len(rows))
        for stage in range(n_stages):
            ax.bar(range(len(rows)), shares[:, stage], bottom=bottom, width=1.0, color=colours[stage % len(colours)],
                   label=f"stage {stage}")  # fmt: skip
            bottom += shares[:, stage]
        for k in range(1, len(rows)):
            if rows[k]["stage"] != rows[k - 1]["stage"]:
                ax.axvline(k - 0.5, color="k", lw=1.2)
        ax.set_ylabel("share")
        ax.set_title(arm, fontsize=9)
    axes[0].legend(fontsize=7, ncol=n_stages, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xlabel("sleep (black lines: a new stage begins)")
    figure.suptitle(f"which stage the replayed sequences come from, sleep by sleep (seed {seed})", fontsize=10)
    save_figure(figure, path)


# -- the experiment --------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    s, arms = results["settings"], results["arms"]
    control = arms.get("no_replay")
    lines = [
        "# Sleep against forgetting: retention across stages, replay policies at equal compute",
        "",
        f"{s['stages']} stages of {s['novel']} (disjoint slices; stage 0 plain, stages 1.. under a token cipher each), "
        f"{s['steps']} trainer steps of {s['batch']} x {s['block']} tokens per stage, lr {s['lr']:g}; replaying arms "
        f"add one optimiser step on {s['replay']} sequences every {s['every']} steps (replay share "
        f"{s['replay_share']:.1%} of sequences; heap/reservoir capacity {s['capacity']}); {s['seeds']} seed(s), "
        f"mean ± sd; lower CE is better. Awake block: {s['awake']}. {s['machine']}.",
        "",
        arms_table(arms, TABLE_METRICS),
        "",
    ]
    if control:
        lines.append(f"Positive control: no_replay's forgetting {format_mean_sd(control['forgetting_mean'], control['forgetting_sd'])} "
                     f"nats (> 0: the protocol forgets).")  # fmt: skip
        lines.append("")
    paired = [arm for arm, row in arms.items() if "forgetting_vs_no_replay" in row]
    if paired:
        lines += ["Paired difference against no_replay (same seed; negative: less forgetting, lower CE):", "",
                  "| arm | Δ forgetting | Δ final CE |", "|---|---:|---:|"]  # fmt: skip
        for arm in paired:
            f, c = arms[arm]["forgetting_vs_no_replay"], arms[arm]["final_ce_vs_no_replay"]
            lines.append(f"| {arm} | {format_mean_sd(f['mean'], f['sd'])} | {format_mean_sd(c['mean'], c['sd'])} |")
        lines.append("")
    per_seed = results.get("per_seed", [])
    others = [arm for arm in ("uniform_replay", *EXTRA) if arm in arms]
    if "sleep" in arms and others and per_seed:  # the goal compares sleep with uniform replay: pair it too
        lines += ["Paired difference, sleep minus another arm (same seed; negative: sleep forgets less, has lower "
                  "CE):", "", "| against | Δ forgetting | Δ final CE |", "|---|---:|---:|"]  # fmt: skip
        for arm in others:
            f = mean_sd(r["sleep"]["forgetting"] - r[arm]["forgetting"] for r in per_seed)
            c = mean_sd(r["sleep"]["final_ce"] - r[arm]["final_ce"] for r in per_seed)
            lines.append(f"| {arm} | {format_mean_sd(*f)} | {format_mean_sd(*c)} |")
        lines.append("")
    for key, verdict in results.get("verdict", {}).items():
        lines.append(f"- {key}: {verdict}")
    lines += ["", "## Retention matrices R[i][j] (mean over seeds; row: stage scored, column: after stage)", ""]
    for arm, R in results["retention_mean"].items():
        lines.append(f"**{arm}**")
        lines.append("")
        lines.append("| stage | " + " | ".join(f"after {j}" for j in range(len(R))) + " |")
        lines.append("|---|" + "---:|" * len(R))
        for i, row in enumerate(R):
            lines.append(f"| {i} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    lines += ["## Cost and bookkeeping", "",
              "| arm | optimiser steps | new-stage tokens | replay share | replayed from earlier stages | memory held (KiB) |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for arm, row in arms.items():
        lines.append(f"| {arm} | {row['optimizer_steps_mean']:.0f} | {row['new_stage_tokens_mean']:.0f} | "
                     f"{row['replay_share_mean']:.3f} | {row['earlier_stage_replay_share_mean']:.3f} | "
                     f"{row['memory_held_bytes_mean'] / 1024:.1f} |")  # fmt: skip
    lines += ["", "Pictures: `retention.png`, `fmri.png` (the sleep arm's dreams per layer and tick across the stages), "
              "`rotation.png` (the stage of every replayed sequence, sleep by sleep).", ""]  # fmt: skip
    return "\n".join(lines)


def verdict(arms: dict) -> dict[str, str]:
    needed = {"no_replay", "uniform_replay", "sleep"}
    if not needed <= set(arms):
        return {}
    f = {arm: arms[arm]["forgetting_mean"] for arm in arms}
    ce = {arm: arms[arm]["final_ce_mean"] for arm in arms}
    out = {
        "sleep forgetting <= 0.5 x no_replay's": f"{f['sleep'] <= 0.5 * f['no_replay']} ({f['sleep']:.3f} vs "
                                                 f"{0.5 * f['no_replay']:.3f})",
        "sleep forgetting < uniform_replay's": f"{f['sleep'] < f['uniform_replay']} ({f['sleep']:.3f} vs "
                                               f"{f['uniform_replay']:.3f})",
        "sleep final CE no worse than no_replay's": f"{ce['sleep'] <= ce['no_replay']} ({ce['sleep']:.3f} vs "
                                                    f"{ce['no_replay']:.3f})",
    }  # fmt: skip
    if "uniform_replay" in ce:
        out["sleep final CE no worse than uniform_replay's"] = f"{ce['sleep'] <= ce['uniform_replay']} " \
                                                                f"({ce['sleep']:.3f} vs {ce['uniform_replay']:.3f})"
    return out
