"""The summary, tables and picture of eval/thinking_tasks.py (the thinking suite): per task and arm, accuracy per
difficulty as mean ± sd over seeds."""

from __future__ import annotations

from pathlib import Path

from harness import format_mean_sd, mean_sd, stat


def summarize(per_seed: list[dict], arms: list[str], descriptions: dict[str, str]) -> dict:
    """Per arm: each per-difficulty metric as {difficulty: {"mean", "sd"}} over seeds."""
    out = {}
    for arm in arms:
        rows = [record[arm] for record in per_seed if arm in record]
        if not rows:
            continue
        entry = {"description": descriptions[arm]}
        for metric in ("accuracy", "mean_ticks"):
            if metric in rows[0]:
                entry[metric] = {}
                for level in rows[0][metric]:
                    entry[metric][level] = stat(row[metric][level] for row in rows)
        for field in ("parameters", "layers", "forward_flops_per_token"):
            if field in rows[0]:
                entry[field] = rows[0][field]
        if "train_seconds" in rows[0]:
            entry["train_seconds"] = mean_sd(row["train_seconds"] for row in rows)[0]
        out[arm] = entry
    return out


def task_table(name: str, arms: dict, difficulty_label: str) -> str:
    levels = list(next(iter(arms.values()))["accuracy"])
    head = "| arm | layers | params | FLOPs/token | " + " | ".join(f"{difficulty_label}={k}" for k in levels) + " |"
    lines = [f"### {name}: accuracy (mean ± sd over seeds)", "", head, "|" + "---|" * (4 + len(levels))]
    for arm, entry in arms.items():
        cells = [format_mean_sd(entry["accuracy"][k]["mean"], entry["accuracy"][k]["sd"], 2) for k in levels]
        flops_cell = f"{entry['forward_flops_per_token'] / 1e6:.2f} M" if "forward_flops_per_token" in entry else ""
        lines.append(
            f"| {arm} | {entry.get('layers', '')} | {entry.get('parameters', '')} | {flops_cell} | "
            + " | ".join(cells)
            + " |"
        )
    if "halting" in arms and "mean_ticks" in arms["halting"]:
        ticks = arms["halting"]["mean_ticks"]
        lines += ["", "halting, mean ticks used: " + ", ".join(f"{k}: {v['mean']:.2f}" for k, v in ticks.items())]
    return "\n".join(lines)


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["arms"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        for arm, entry in result["arms"][name].items():
            levels = list(entry["accuracy"])
            means = [entry["accuracy"][k]["mean"] for k in levels]
            sds = [entry["accuracy"][k]["sd"] for k in levels]
            ax.errorbar([int(k) for k in levels], means, yerr=sds, label=arm, marker="o", capsize=2)
        ax.set_title(name)
        ax.set_xlabel("bits covered (bucket)" if name == "parity" else "hops k")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_markdown(result: dict) -> str:
    """results.md: the settings, then per task its accuracy table and E2 per seed, then the picture."""
    settings = {k: v for k, v in result["settings"].items() if k not in ("seeds", "arms")}
    markdown = ["# The thinking suite", "", f"{result['settings']['seeds']} seed(s); settings: `{settings}`", ""]
    for name, arms_of_task in result["arms"].items():
        label = "bits" if name == "parity" else "k"
        markdown += [task_table(name, arms_of_task, label), "", f"E2 (k8) per seed: {result['e2'][name]}", ""]
    markdown += ["![accuracy per difficulty](accuracy.png)", ""]
    return "\n".join(markdown)
