"""The main job: train the phases 1 -> 2 -> 3 on a preset, evaluate each on held-out text, write samples, model cards
and a summary table into one run folder.

    python recipes/run_all.py --preset tiny --output runs/tiny [--push-to-hub NAMESPACE/NAME]
"""

import argparse
import json
import time
from pathlib import Path

import phase1_language
import phase2_thinking
import phase3_continuity
from common import PHASE_FOLDERS, load_preset, prepare_data

from modeling_ctm.hub import push_run


COLUMNS = [
    ("phase", "phase"),
    ("trainable", "trainable params"),
    ("steps", "steps"),
    ("train_s", "train s"),
    ("objective", "held-out objective"),
    ("final", "final-tick loss"),
    ("most_certain", "most-certain loss"),
    ("argmin", "argmin-tick loss"),
    ("bpb_final", "bpb (final)"),
    ("bpb_certain", "bpb (most-certain)"),
]


def summary_row(result) -> dict:
    m = result.metrics
    thinks = "eval_loss_final_tick" in m
    return {
        "phase": f"{result.phase} {PHASE_FOLDERS[result.phase].split('-', 1)[1]}",
        "trainable": f"{result.n_trainable:,}",
        "steps": result.steps,
        "train_s": f"{result.train_seconds:.0f}",
        "objective": f"{m['eval_loss']:.3f}",
        "final": f"{m['eval_loss_final_tick'] if thinks else m['eval_loss']:.3f}",
        "most_certain": f"{m['eval_loss_most_certain_tick']:.3f}" if thinks else "-",
        "argmin": f"{m['eval_loss_argmin_tick']:.3f}" if thinks else "-",
        "bpb_final": f"{m['eval_bpb_final_tick'] if thinks else m['eval_bpb']:.3f}",
        "bpb_certain": f"{m['eval_bpb_most_certain_tick']:.3f}" if thinks else "-",
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="a preset name in recipes/presets or a YAML path")
    parser.add_argument("--output", type=Path, default=None, help="run folder (default runs/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted phases from their checkpoints")
    parser.add_argument("--push-to-hub", metavar="NAMESPACE/NAME", help="publish every phase (modeling_ctm.hub)")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    run_dir = args.output or Path("runs") / preset["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data = prepare_data(preset, run_dir)
    print(f"data: {data.description}; held-out unigram baseline {data.unigram_nats:.3f} nats/token")
    results = [phase1_language.run(preset, run_dir, data, resume=args.resume)]
    results.append(phase2_thinking.run(preset, run_dir, data, results[-1].folder, resume=args.resume))
    results.append(phase3_continuity.run(preset, run_dir, data, results[-1].folder, resume=args.resume))
    total = time.perf_counter() - started

    rows = [summary_row(result) for result in results]
    table = markdown_table(rows)
    samples = "\n".join(f"- phase {result.phase}: {sample!r}" for result in results for sample in result.samples)
    report = (
        f"# Run `{run_dir}` (preset `{preset['name']}`)\n\n{table}\n\n"
        f"Held-out unigram baseline: {data.unigram_nats:.3f} nats/token. Total wall time {total:.0f} s.\n"
        f"Losses in nats/token on {data.eval_description}; bpb = bits per UTF-8 byte.\n\n## Greedy samples\n\n{samples}\n"
    )
    (run_dir / "summary.md").write_text(report)
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "preset": preset["name"],
                "total_seconds": total,
                "unigram_baseline": data.unigram_nats,
                "phases": [
                    {"phase": r.phase, "folder": str(r.folder), "metrics": r.metrics, "samples": r.samples}
                    for r in results
                ],
            },
            indent=2,
        )
    )
    print(report)
    if args.push_to_hub:
        for repo, commit in push_run(run_dir, args.push_to_hub).items():
            print(f"pushed {repo} @ {commit}")


if __name__ == "__main__":
    main()
