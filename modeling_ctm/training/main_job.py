"""The main job: phases 1 -> 2 -> 3 -> 4 of a preset into one run folder, and its summary table.

`ctm train` and `recipes/run_all.py` both call `main_job`; each phase is a recipe class of `phases.PHASES`.
"""

import argparse
import json
import os
import time
from pathlib import Path

from ..hub.publishing import push_run
from ..io_ctm import atomic_write
from .phases import get_phase
from .recipe_config import RecipeConfig
from .runs import add_preset_arguments, load_preset, prepare_data, run_phase


COLUMNS = [
    ("phase", "phase"),
    ("trainable", "trainable params"),
    ("steps", "steps"),
    ("train_s", "train s"),
    ("objective", "held-out objective"),
    ("readout", "readout loss (deployed)"),
    ("final", "final-tick loss"),
    ("most_certain", "most-certain loss"),
    ("mixture", "tick-mixture loss"),
    ("argmin", "argmin-tick loss"),
    ("bpb_readout", "bpb (deployed)"),
    ("para_readout", "paragraphs: deployed"),
    ("para_final", "paragraphs: final"),
    ("para_certain", "paragraphs: most-certain"),
    ("para_mixture", "paragraphs: mixture"),
    ("recall", "in-context recall"),
    ("gauge_residual", "block / residual"),
    ("gauge_variation", "S_out variation"),
]


def summary_row(result) -> dict:
    m = result.metrics
    thinks = "eval_loss_final_tick" in m

    def value(key, fallback=None):
        key = key if key in m else fallback
        return f"{m[key]:.3f}" if key in m else "-"

    return {
        "phase": f"{result.phase} {get_phase(result.phase).name}",
        "trainable": f"{result.n_trainable:,}",
        "steps": result.steps,
        "train_s": f"{result.train_seconds:.0f}",
        "objective": value("eval_loss"),
        "readout": value("eval_loss_readout"),
        "final": value("eval_loss_final_tick", "eval_loss"),
        "most_certain": value("eval_loss_most_certain_tick") if thinks else "-",
        "mixture": value("eval_loss_tick_mixture") if thinks else "-",
        "argmin": value("eval_loss_argmin_tick") if thinks else "-",
        "bpb_readout": bpb_of_readout(m) if thinks else value("eval_bpb"),
        "para_readout": value("paragraphs_loss_readout"),
        "para_final": value("paragraphs_loss_final_tick", "paragraphs_loss"),
        "para_certain": value("paragraphs_loss_most_certain_tick") if thinks else "-",
        "para_mixture": value("paragraphs_loss_tick_mixture") if thinks else "-",
        "recall": value("recall_accuracy"),
        "gauge_residual": gauge_cell(m, "block_to_residual"),
        "gauge_variation": gauge_cell(m, "sync_variation"),
    }


def gauge_cell(m: dict, field: str) -> str:
    """One block-health gauge field for every thinking layer (`a / b` with several), "-" without thinking layers."""
    values = [value for key, value in sorted(m.items()) if key.startswith("gauge_layer") and key.endswith(field)]
    return " / ".join(f"{value:.3g}" for value in values) or "-"


def bpb_of_readout(m: dict) -> str:
    """bits per byte of the deployed readout: the bpb metric whose loss equals `eval_loss_readout`."""
    for name in ("final_tick", "most_certain_tick", "tick_mixture"):
        if m.get(f"eval_loss_{name}") == m["eval_loss_readout"] and f"eval_bpb_{name}" in m:
            return f"{m[f'eval_bpb_{name}']:.3f}"
    return "-"


def online_summary(m: dict) -> str:
    """Phase 4's memory figures, next to its losses."""
    return (
        f"Phase 4 lived {m['online_conversations']} conversations ({m['online_tokens']:,} tokens): recall rate "
        f"{m['online_recall_rate']:.2f}, {m['online_episodes']} episodes stored, {m['online_edits_applied']} Hebbian "
        f"edits applied ({m['online_edits_skipped']} skipped; largest weight-norm drift from the anchors "
        f"{m['online_max_norm_drift']:.3f}), {m['online_sleeps']} sleeps; memory held "
        f"{m['online_brain_bytes'] / 2**20:.2f} MiB; {m['online_ms_per_token_on']:.1f} ms/token with the memory "
        f"stack on vs {m['online_ms_per_token_off']:.1f} off (generate, batch 1)."
    )


def phase_times(results) -> str:
    """Each phase's wall time: building its model and data, training (or living, phase 4), its finish step."""
    cells = []
    for r in results:
        finish, total = sum(r.extra.get("finish_seconds", {}).values()), r.extra.get("phase_seconds", 0.0)
        cells.append(f"phase {r.phase} {total:.0f} s: setup {total - r.train_seconds - finish:.0f}, "
                     f"train {r.train_seconds:.0f}, finish {finish:.0f}")
    return "; ".join(cells)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main_job(config: RecipeConfig, run_dir: Path, resume: bool = False, push_to_hub: str | None = None) -> dict:
    """Run every phase the recipe has (4 only with a `phase4` section), write `summary.md` and `summary.json`
    atomically, optionally push every phase. Returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(config, run_dir)
    print(f"data: {data.description}; held-out unigram baseline {data.unigram_nats:.3f} nats/token")
    results = []
    for phase in [1, 2, 3] + ([4] if config.phase4 is not None else []):
        source = results[-1].folder if results else None
        phase_started = time.perf_counter()
        results.append(run_phase(phase, config, run_dir, data, source, resume=resume))
        results[-1].extra["phase_seconds"] = time.perf_counter() - phase_started
    total = time.perf_counter() - started
    write_summary(config, run_dir, data, results, total)
    if push_to_hub:
        for repo, commit in push_run(run_dir, push_to_hub).items():
            print(f"pushed {repo} @ {commit}")
    return json.loads((run_dir / "summary.json").read_text())


def write_summary(config: RecipeConfig, run_dir: Path, data, results: list, total: float) -> None:
    """`summary.md` (the table, phase 4's memory figures, the samples) and `summary.json`, each written atomically."""
    rows = [summary_row(result) for result in results]
    table = markdown_table(rows)
    online = results[-1].metrics if results[-1].phase == 4 else None
    if online:
        table += "\n\n" + online_summary(online)
    samples = "\n".join(f"- phase {result.phase}: {sample!r}" for result in results for sample in result.samples)
    report = (
        f"# Run `{run_dir}` (preset `{config.name}`)\n\n{table}\n\n"
        f"Held-out unigram baseline: {data.unigram_nats:.3f} nats/token. Total wall time {total:.0f} s "
        f"({phase_times(results)}; load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end).\n"
        f"Losses in nats/token on {data.eval_description}; bpb = bits per UTF-8 byte. The deployed readout is the "
        f"tick `ctm_readout` selects (what `logits` and `generate` use); argmin is the optimistic oracle. "
        f"block / residual and S_out variation are the block-health gauge of each thinking layer (`ctm inspect`): "
        f"near 0, the block adds nothing or a constant.\n\n"
        f"## Greedy samples\n\n{samples}\n"
    )
    atomic_write(run_dir / "summary.md", lambda tmp: Path(tmp).write_text(report))
    summary = {
        "preset": config.name,
        "total_seconds": total,
        "unigram_baseline": data.unigram_nats,
        "phases": [
            {"phase": r.phase, "folder": str(r.folder), "metrics": r.metrics, "samples": r.samples,
             "seconds": {"phase": r.extra.get("phase_seconds"), "train": r.train_seconds,
                         **{f"finish_{k}": v for k, v in r.extra.get("finish_seconds", {}).items()}}}
            for r in results
        ],
    }
    atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(report)


def main_job_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_preset_arguments(parser)
    parser.add_argument("--output", type=Path, default=None, help="run folder (default runs/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted phases from their checkpoints")
    parser.add_argument("--push-to-hub", metavar="NAMESPACE/NAME", help="publish every phase (modeling_ctm.hub.publishing)")
    return parser


def main_job_from_args(args: argparse.Namespace) -> dict:
    """The recipe config is loaded and checked whole before any data or model (a bad key fails in seconds)."""
    config = load_preset(args.preset, getattr(args, "overrides", ()))
    return main_job(config, args.output or Path("runs") / config.name, args.resume, args.push_to_hub)
