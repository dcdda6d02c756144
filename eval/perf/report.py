"""Reporting: the performance table, the profile tables and the throughput plot."""

from __future__ import annotations

import json
from pathlib import Path

from .phase3 import GOAL_CHUNKED_RATIO, phase3_markdown


GOAL_EFFICIENCY = 0.8  # CTM achieved FLOP/s >= 0.8 x Llama achieved FLOP/s


def fmt(value, spec=".2f", missing="-"):
    return missing if value is None else format(value, spec)


def markdown_table(results: list[dict], contexts: list[int]) -> str:
    head = (
        "| shape | model | params M | train GFLOP/tok | FLOPs x Llama | tok/s | tok/s x Llama | achieved GFLOP/s "
        "| eff. x Llama | goal >= 0.8 | peak MiB | " + " | ".join(f"decode ms @{c}" for c in contexts) + " |"
    )
    lines = [head, "|" + "---|" * (11 + len(contexts))]
    for r in results:
        if r["status"] != "ok":
            lines.append(
                f"| {r['shape']} | {r['model']} | {r['params_m']:.2f} | {r['status']} |" + " |" * (7 + len(contexts))
            )
            continue
        goal = "-" if r["kind"] == "llama" else ("PASS" if r.get("goal_efficiency_met") else "FAIL")
        mem = r.get("memory", {}).get("peak_mib")
        decode = " | ".join(fmt(r["decode"][str(c)]["ms_per_token"], ".1f") for c in contexts)
        lines.append(
            f"| {r['shape']} | {r['model']} | {r['params_m']:.2f} | {r['flops']['training'] / 1e9:.4f} | "
            f"{fmt(r.get('flops_ratio_vs_llama'), '.1f')} | {r['tokens_per_s']:.0f} | "
            f"{fmt(r.get('tokens_ratio_vs_llama'), '.3f')} | {r['achieved_flops'] / 1e9:.2f} | "
            f"{fmt(r.get('efficiency_vs_llama'), '.2f')} | {goal} | {fmt(mem, '.0f')} | {decode} |"
        )
    return "\n".join(lines)


def decode_markdown(results: list[dict], contexts: list[int]) -> str:
    """Cached decode latency per context against the shape's Llama, and the decode goal: the CTM's step costs at
    most its FLOP ratio times the Llama's at every context."""
    keys = [str(c) for c in contexts]
    head = (
        "| shape | model | FLOPs x Llama | "
        + " | ".join(f"ms @{c}" for c in contexts)
        + " | "
        + " | ".join(f"x Llama @{c}" for c in contexts)
        + " | <= FLOP ratio |"
    )
    lines = [head, "|" + "---|" * (4 + 2 * len(contexts))]
    for r in results:
        if r["status"] != "ok" or "decode" not in r:
            continue
        ratios = r.get("decode_ratio_vs_llama", {})
        goal = "-" if r["kind"] == "llama" else ("yes" if r.get("goal_decode_met") else "no")
        lines.append(
            f"| {r['shape']} | {r['model']} | {fmt(r.get('flops_ratio_vs_llama'), '.1f')} | "
            + " | ".join(fmt(r["decode"][k]["ms_per_token"], ".2f") for k in keys)
            + " | "
            + " | ".join(fmt(ratios.get(k), ".1f") for k in keys)
            + f" | {goal} |"
        )
    goals = [r for r in results if r["kind"] == "ctm" and r["status"] == "ok" and "goal_decode_met" in r]
    met = sum(bool(r["goal_decode_met"]) for r in goals)
    lines += ["", f"Goal cached decode x Llama <= FLOP ratio at every context: met by {met}/{len(goals)} CTM rows."]
    return "\n".join(lines)


def plot(results: list[dict], contexts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs, ys, eff = [], [], []
        for j, shape in enumerate(shapes):
            row = next((r for r in ok if r["shape"] == shape and r["model"] == model), None)
            if row:
                xs.append(j + i * width)
                ys.append(row["achieved_flops"] / 1e9)
                eff.append(row.get("efficiency_vs_llama") or 0.0)
        axes[0].bar(xs, ys, width, label=model)
        axes[1].bar(xs, eff, width, label=model)
    for ax in axes[:2]:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
    axes[0].set_ylabel("achieved training GFLOP/s")
    axes[0].set_title("Achieved FLOP/s (analytic FLOPs x measured tokens/s)")
    axes[0].legend(fontsize=8)
    axes[1].axhline(GOAL_EFFICIENCY, color="red", linestyle="--", label=f"goal {GOAL_EFFICIENCY}")
    axes[1].set_ylabel("CTM FLOP/s / Llama FLOP/s")
    axes[1].set_title("FLOP/s efficiency vs same-shape Llama")
    for model in models:
        for shape in shapes[-1:]:
            row = next((r for r in ok if r["shape"] == shape and r["model"] == model), None)
            if row:
                axes[2].plot(
                    contexts, [row["decode"][str(c)]["ms_per_token"] for c in contexts], marker="o", label=model
                )
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("context length")
    axes[2].set_ylabel("ms / token (cached decode, batch 1)")
    axes[2].set_title(f"Decode latency, {shapes[-1] if shapes else ''}")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_markdown(profile: dict) -> str:
    lines = [
        f"### Profile: {profile['model']} on {profile['shape']} (one training step, {profile['timer']}, "
        f"{profile['total_ms']:.0f} ms under the profiler; other processes used "
        f"{fmt(profile['foreign_load'], '.0%')} of the CPUs meanwhile)",
        "",
        "| piece | fwd ms | bwd ms | opt ms | total ms | time % | FLOP % | achieved GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in profile["categories"].items():
        rate = f"{r['gflops_per_s']:.1f}" if r["gflops_per_s"] and r["train_gflop"] else "-"
        lines.append(
            f"| {name} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['opt_ms']:.1f} | {r['total_ms']:.1f} | "
            f"{100 * r['time_share']:.1f} | {100 * r['flop_share']:.1f} | {rate} |"
        )
    lines += [
        "",
        "Top ops by self time:",
        "",
        "| op | input shapes | piece/phase | self ms | calls |",
        "|---|---|---|---:|---:|",
    ]
    for r in profile["top_ops"][:15]:
        lines.append(f"| {r['op']} | `{r['shapes']}` | {r['category']} | {r['self_ms']:.1f} | {r['calls']} |")
    return "\n".join(lines)


def results_markdown(
    preset_name: str, device: str, env: dict, elapsed: float, results, profiles, contexts, phase3=()
) -> str:
    """results.md: the conventions, the table with the goal count, the phase-3 rows and the profiles."""
    lines = [
        f"# CTM vs same-shape Llama: performance ({preset_name} preset)",
        "",
        f"Environment: {json.dumps(env)}. Wall time of the benchmark: {elapsed:.0f} s.",
        "",
        "Training FLOPs are analytic (eval/flops.py: multiply-add = 2, causal attention (T+1)/2 keys, training = 3 x "
        "forward). Achieved GFLOP/s = training FLOPs/token x measured tokens/s (fwd + bwd + AdamW, median of the "
        "timed steps on a quiet machine). eff. x Llama = CTM achieved FLOP/s / Llama achieved FLOP/s "
        f"(goal >= {GOAL_EFFICIENCY}). Peak MiB: params + AdamW state + the step's transient peak "
        f"({'max_memory_allocated' if device == 'cuda' else 'RSS growth'}). Decode: ms per cached "
        f"single-token step after prefilling the context, {env.get('decode_batch', 1)} sequence(s) per step.",
        "",
    ]
    training = [r for r in results if r["status"] != "ok" or "tokens_per_s" in r]
    if training:
        lines.append(markdown_table(training, contexts))
        goals = [r for r in results if r["kind"] == "ctm" and r["status"] == "ok"]
        met = sum(bool(r.get("goal_efficiency_met")) for r in goals)
        lines += ["", f"Goal CTM achieved FLOP/s >= {GOAL_EFFICIENCY} x Llama's: met by {met}/{len(goals)} CTM rows."]
    if any("decode" in r for r in results):
        lines += ["", f"### Cached decode against the Llama (batch {env.get('decode_batch', 1)})", ""]
        lines.append(decode_markdown(results, contexts))
    compiled_rows = [r for r in results if r.get("compiled") and r["status"] == "ok"]
    if compiled_rows:
        lines += [
            "",
            "### Compiled (`--compile`): what compiling cost",
            "",
            "torch.compile (inductor) of the training step and of the cached single-token decode step (static cache: "
            "`CTMCache(max_cache_len=N)` / `StaticCache`, one room for every context). Compile s: the first step's "
            "seconds (tracing + inductor). Graphs: compiled by the warm-up / first decode steps (0 would mean the step "
            "ran eagerly). Recompiles: graphs compiled after them (0 wanted).",
            "",
            "| model | train compile s | train graphs | train recompiles | decode compile s | decode graphs "
            "| decode recompiles |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in compiled_rows:
            lines.append(
                f"| {r['shape']} {r['model']} | {fmt(r.get('first_step_s'), '.1f')} | "
                f"{r.get('graphs_after_warmup', '-')} | "
                f"{r.get('training_recompiles', '-')} | {r.get('decode_compile_s', 0):.1f} | "
                f"{r.get('decode_graphs', '-')} | {r.get('decode_recompiles', '-')} |"
            )
    if phase3:
        goals = [r for r in phase3 if r["status"] == "ok" and r["cut_attention"] is not None]
        met = sum(bool(r.get("goal_chunked_met")) for r in goals)
        lines += [
            "",
            "### Phase 3: ContinuityTrainer's chunk loop against unchunked training of the same model",
            "",
            "`ctm_carry='chunk'` with chunk size C; chunked rows run `ContinuityTrainer.training_step` over chunks of "
            "`chunk length` tokens with gradient window W (attention KV kept through the cache, or cut at every "
            "boundary), then the same AdamW step. x unchunked = tokens/s / tokens/s of one full-sequence step.",
            "",
            phase3_markdown(phase3),
            "",
            f"Goal chunked tokens/s >= {GOAL_CHUNKED_RATIO} x unchunked: met by {met}/{len(goals)} chunked rows.",
        ]
    for profile in profiles:
        lines += ["", profile_markdown(profile)]
    return "\n".join(lines)
