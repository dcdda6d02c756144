"""results.md and the stability picture of eval/plasticity_e7.py (E7 + E12), from its results object."""

from __future__ import annotations

import json
from pathlib import Path

from modeling_ctm.io_ctm import atomic_write


def draw_stability(stability: dict, path: Path, band: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, ratios in stability["_norms"].items():
        top.plot(range(1, len(ratios) + 1), ratios, label=name.replace("model.layers.", "L"), linewidth=0.8)
    for edge in (1 - band, 1 + band):
        top.axhline(edge, color="k", linestyle="--", linewidth=0.7)
    top.set_ylabel("||W|| / ||W_anchor||")
    top.legend(fontsize=7)
    edits, ce = zip(*stability["ce_curve"])
    bottom.plot(edits, ce, marker="o")
    bottom.axhline(stability["ce_u_start"] + stability["ce_u_bound"], color="r", linestyle="--", linewidth=0.7)
    bottom.set_ylabel("CE on unrelated text")
    bottom.set_xlabel("edit")
    fig.suptitle(f"{stability['edits']} consecutive Hebbian edits ({stability['tokens_per_edit']} tokens each)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def format_markdown(result: dict) -> str:
    n = len(result["per_seed"])
    rows = []
    for arm, row in result["arms"].items():
        cells = [
            f"{row[f'{m}_mean']:+.4f} ± {row[f'{m}_sd']:.4f}" for m in ("delta_ce_p", "delta_ce_p2", "delta_ce_u")
        ]
        cells.append(f"{row['surprising_share_mean']:.2f} ± {row['surprising_share_sd']:.2f}")
        cells.append(f"{row['fact_recall_mean']:.3f} ± {row['fact_recall_sd']:.3f}")
        cells.append(f"{row['fact_margin_mean']:+.3f}")
        cells.append(f"{row['fact_bleed_mean']:.3f} ± {row['fact_bleed_sd']:.3f}")
        cells.append(f"{row['delta_ce_p_mean'] - row['delta_ce_u_mean']:+.4f}")
        rows.append(f"| {arm} | {row['description']} | " + " | ".join(cells) + " |")
    st, cost = result["stability"], result["cost"]
    frac = result["gated_fraction_of_sgd_delta_ce_p"]
    diff = result["gated_minus_random_delta_ce_p"]
    return f"""# E7 + E12: Hebbian plasticity on re-exposure ({n} seeds)

One edit after reading P once; CE measured with the context cleared. ΔCE < 0 is better. Same-norm controls: `random`,
`sgd`. Fact recall: chance {result['fact_chance']:.3f}. Surprising share: the fraction of the CE drop on P that falls on
the 25% most surprising tokens of P (0.25 if spread evenly). Fact margin: log P(true code) minus the mean over the
codes. Fact bleed: how often one of the 7 names never stated answers the stored code (the edit is not specific to
the stated name). ΔP − ΔU: the part of the CE drop on P that is specific to P. Training: {result['settings']['train_steps']} steps,
{result['train_seconds']:.0f} s, last logged loss {result['train_log'][-1]['loss'] if result['train_log'] else 'n/a'}.

| arm | what | ΔCE P | ΔCE P′ | ΔCE U | surprising share | fact recall | fact margin | fact bleed | ΔP − ΔU |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Gated ΔCE_P minus random ΔCE_P: {diff['mean']:+.4f} ± {diff['sd']:.4f} (negative: the rule beats the random control).
Fraction of the SGD step's ΔCE_P the gated rule reaches: {frac['mean']:.3f} ± {frac['sd']:.3f}.

## Stability
{st['edits']} consecutive edits ({st['tokens_per_edit']} tokens each, {st['seconds']} s): inside the band every edit:
{st['inside_band']}; norm ratio min {st['norm_ratio_min']}, max {st['norm_ratio_max']}; NaN or skipped: {st['nan_or_skipped']};
final distance to the anchor / anchor norm: {st['final_drift_over_anchor_norm']}.
CE on unrelated text: {st['ce_u_start']:.4f} at the start, max {st['ce_u_max']:.4f}, end {st['ce_u_end']:.4f}
(bound: rise <= {st['ce_u_bound']}; within: {st['ce_u_within_bound']}). Picture: stability.png.

## Cost
Forward of {cost['tokens_per_forward']} tokens: {cost['ms_per_token_off']:.4f} ms/token off, {cost['ms_per_token_on']:.4f}
ms/token on (overhead {100 * cost['overhead_on_vs_off']:.1f} %); one edit incl. its forward {cost['ms_per_edit_including_forward']:.1f} ms.
Memory held: {cost['memory_held_bytes']} bytes (anchors + statistics); transient buffers per forward:
{cost['transient_buffer_bytes_per_forward']} bytes. Machine: {result['machine_note']}.

Wall time {result['wall_seconds']:.0f} s. Plasticity config: `{json.dumps(result['plasticity_config'])}`
"""
