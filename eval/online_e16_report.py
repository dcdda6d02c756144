"""results.md, the answer and the retention picture of eval/online_e16.py (E16), from its results object."""

from __future__ import annotations

from pathlib import Path

from harness import format_mean_sd


def draw_retention(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modeling_ctm.fmri import save_figure

    ns = result["settings"]["distractors"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, title in ((axes[0], "recall", "recall (10 codes)"), (axes[1], "answer_logp", "log p(answer)")):
        for arm in result["retention"]:
            means = [result["retention"][arm][str(n)][f"{metric}_mean"] for n in ns]
            sds = [result["retention"][arm][str(n)][f"{metric}_sd"] for n in ns]
            axis.errorbar(ns, means, yerr=sds, marker="o", capsize=3, label=arm)
        if metric == "recall":
            axis.axhline(result["chance"], color="grey", linestyle=":", label="chance")
        axis.set_xlabel("distractor conversations N")
        axis.set_title(title)
    axes[0].legend(fontsize=7)
    figure.suptitle("E16: retention of 10 told facts in a new conversation, mean ± sd over seeds")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def format_markdown(result: dict) -> str:
    settings, arms = result["settings"], result["arms"]
    ns = settings["distractors"]
    metrics = [key[: -len("_mean")] for key in arms["off"] if key.endswith("_mean")]
    lines = [
        "# E16: online learning, facts told once, asked in a new conversation after N other conversations",
        "",
        f"{settings['seeds']} seeds x {settings['trials']} fact sets of {settings['facts']} facts; chance "
        f"{result['chance']:.2f}. Run took {result['machine']['seconds']:.0f} s, foreign CPU load "
        f"{result['machine']['foreign_load']} (share of the machine other processes used).",
        "",
        f"## Every metric at N = {ns[-1]} (mean ± sd over seeds)",
        "",
        "| arm | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for arm in arms:
        cells = [format_mean_sd(arms[arm][f"{m}_mean"], arms[arm][f"{m}_sd"]) for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Retention: recall by N", "", "| arm | " + " | ".join(f"N={n}" for n in ns) + " |",
              "|---|" + "---|" * len(ns)]  # fmt: skip
    for arm in arms:
        row = result["retention"][arm]
        lines.append(
            f"| {arm} | "
            + " | ".join(format_mean_sd(row[str(n)]["recall_mean"], row[str(n)]["recall_sd"]) for n in ns)
            + " |"
        )
    lines += ["", "## Cost (mean over seeds)", "", "| arm | ms/token | bytes held |", "|---|---|---|"]
    for arm, figures in result["cost"].items():
        lines.append(f"| {arm} | {figures['ms_per_token']:.2f} | {int(figures.get('bytes_held', 0)):,} |")
    lines += ["", "![retention](retention.png)", "", answer(result)]
    return "\n".join(lines) + "\n"


def answer(result: dict) -> str:
    """One sentence per question, from the numbers: does an arm beat `off` by more than both sds, at the largest N?"""
    arms, last = result["arms"], result["settings"]["distractors"][-1]
    off_mean, off_sd = arms["off"]["recall_mean"], arms["off"]["recall_sd"]
    beating = [
        arm for arm in ("episodic", "hebbian", "learn_from", "all")
        if arms[arm]["recall_mean"] - off_mean > arms[arm]["recall_sd"] + off_sd
    ]  # fmt: skip
    placebo_ok = arms["placebo"]["recall_mean"] <= off_mean + off_sd + arms["placebo"]["recall_sd"]
    said = ", ".join(beating) if beating else "none of the mechanisms"
    return (
        f"**Answer.** After N={last} distractor conversations, {said} recall(s) the told facts better than the "
        f"stack off (by more than one sd of each); the oracle reaches {arms['oracle']['recall_mean']:.2f} and rag "
        f"{arms['rag']['recall_mean']:.2f} against off {off_mean:.2f} (chance {result['chance']:.2f}); the placebo "
        f"{'stays at or below' if placebo_ok else 'rises above'} off ({arms['placebo']['recall_mean']:.2f})."
    )
