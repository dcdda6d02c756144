"""The answer, tables and results.md of eval/thinking_pays.py, from its results object (held-out CE per arm and
readout as mean ± sd over seeds, the block-health gauge, E2 tick specialisation)."""

from __future__ import annotations

from harness import format_stat


READOUTS = ("final", "readout", "most_certain", "argmin")  # the readouts of the table, in its column order
GAUGE = ("block_to_residual", "block_to_mlp", "sync_variation", "entry_share")  # block_health, per CTM arm


def answer(arms: dict, phase1_row: dict) -> str:
    def ce(arm, kind="blocks"):
        return arms[arm][f"{kind}_readout_ce"]["mean"]

    def sd(arm, kind="blocks"):
        return arms[arm][f"{kind}_readout_ce"]["sd"]

    per_step = ce("exact_start") < ce("continued") - sd("continued") - sd("exact_start")
    per_flop = ce("exact_start") < ce("continued_iso_flops") - sd("continued_iso_flops") - sd("exact_start")
    # beyond one sd of the seeds, on both kinds of text
    vs_phase1 = all(
        ce("exact_start", kind) + sd("exact_start", kind) < phase1_row[kind]["final"]
        for kind in ("blocks", "paragraphs")
    )
    verdict = lambda yes: "yes" if yes else "no"  # noqa: E731
    readouts = ""
    for arm in ("exact_start_rms", "exact_start_gated"):
        if arm in arms:  # beyond one sd of each, as above
            pays = ce(arm) < ce("continued") - sd("continued") - sd(arm)
            readouts += (
                f" {arm}: {ce(arm):.3f} ± {sd(arm):.3f}, "
                f"{'beats' if pays else 'does not beat'} continued ({ce('continued'):.3f} ± {sd('continued'):.3f}) "
                "by more than one sd."
            )
    return (
        f"Per step: {verdict(per_step)}, per FLOP: {verdict(per_flop)} - exact_start reaches "
        f"{ce('exact_start'):.3f} nats/token on held-out blocks (deployable readout) vs {ce('continued'):.3f} for "
        f"training the MLP longer at the same steps and {ce('continued_iso_flops'):.3f} at the same FLOPs "
        f"(phase 1 {phase1_row['blocks']['final']:.3f}; exact_start {'beats' if vs_phase1 else 'does not clearly beat'} "
        f"phase 1 on both blocks and paragraphs (by more than one sd)"
        + (f"; the replace arm ends at {ce('replace'):.3f})." if "replace" in arms else ").")
        + readouts
    )


def format_table(result: dict) -> str:
    head = ["arm", "steps", "blocks: final", "blocks: readout", "blocks: most-certain", "blocks: argmin",
            "paragraphs: final", "paragraphs: readout", "paragraphs: most-certain", "train s", "foreign load", "MFLOP/token (train)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    p1 = result["phase1"]
    lines.append(
        f"| phase 1 (start, control) | 0 | {p1['blocks']['final']:.3f} | {p1['blocks']['final']:.3f} | - | - "
        f"| {p1['paragraphs']['final']:.3f} | {p1['paragraphs']['final']:.3f} | - | - | - | - |"
    )
    for arm, row in result["arms"].items():
        cells = [
            arm,
            f"{row['steps']['mean']:.0f}",
            *(format_stat(row[f"blocks_{k}_ce"]) for k in READOUTS),
            *(format_stat(row[f"paragraphs_{k}_ce"]) for k in ("final", "readout", "most_certain")),
            format_stat(row["train_seconds"]).replace(".000", ""),
            f"{row['foreign_load']['mean']:.2f}",
            f"{row['flops_per_token_training']['mean'] / 1e6:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_gauge(result: dict) -> str:
    """The block-health gauge of every CTM arm (is the block awake?)."""
    rows = {arm: row for arm, row in result["arms"].items() if "gauge_sync_variation" in row}
    if not rows:
        return ""
    lines = ["| arm | " + " | ".join(GAUGE) + " |", "|" + "---|" * (len(GAUGE) + 1)]
    for arm, row in rows.items():
        cells = [format_stat(row[f"gauge_{key}"]) if f"gauge_{key}" in row else "-" for key in GAUGE]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "Block-health gauge of the thinking layer (8 held-out blocks):\n\n" + "\n".join(lines) + "\n\n"


def format_e2(arm: str, e2: dict) -> str:
    fmt = lambda pairs: ", ".join(f"{m:.3f} ± {d:.3f}" for m, d in pairs)  # noqa: E731
    ablation = "\n".join(
        f"| {k} | " + " | ".join(f"{v[0]:.3f} ± {v[1]:.3f}" for v in row.values()) + " |"
        for k, row in e2["k_prime_ablation"].items()
    )
    return (
        f"## E2: tick specialisation of {arm} (held-out blocks)\n\n"
        f"- most-certain tick selected (fraction per tick): {fmt(e2['selection_histogram'])}\n"
        f"- lowest-loss tick (fraction per tick): {fmt(e2['argmin_histogram'])}\n"
        f"- per-tick CE: {fmt(e2['per_tick_ce'])}\n"
        f"- Spearman(selected tick, phase-1 CE of the token): rho {e2['spearman_selected_tick_vs_difficulty'][0]:.3f}"
        f" ± {e2['spearman_selected_tick_vs_difficulty'][1]:.3f}, p {e2['spearman_p_value'][0]:.2g}\n\n"
        f"K' < K at inference (the first K' ticks of the same model):\n\n| K' | final | most-certain | mixture |\n"
        f"|---|---|---|---|\n{ablation}\n\n"
    )


def format_markdown(result: dict, table: str) -> str:
    s = result["settings"]
    e2 = "".join(format_e2(key[len("e2_") :], value) for key, value in result.items() if key.startswith("e2_"))
    return (
        f"# Thinking pays? ({s['seeds']} seeds, {s['steps']} steps per arm)\n\n"
        f"Held-out cross-entropy in nats/token, mean ± sd over seeds (new weights and batch order vary; the phase-1 "
        f"checkpoint is shared). Readout = the deployable `{s['readout']}`; argmin is an oracle. "
        f"Machine: {result['machine']} (shared CPU; wall times are indicative).\n\n{table}\n\n"
        f"**Answer.** {result['answer']}\n\n{format_gauge(result)}{e2}"
        "E14 (depth vs thinking time at iso-FLOPs): eval/iso_flops_e14.py.\n"
    )
