"""Score every phase checkpoint of a run with lm-evaluation-harness on the held-out-novel tasks (eval/lm_eval_tasks).

    python eval/lm_eval_phases.py --run runs/tiny --out eval/results/lm_eval_tiny [--limit 50] [--batch-size 4]

Writes DIR/results.json (settings and every phase's lm-eval numbers) and DIR/results.md (one row per phase, the same
tasks). The models go through lm-eval's own `HFLM` (no CTM-specific wrapper: see eval/README.md).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch


TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ["ctm_austen_rolling", "ctm_austen_cloze", "ctm_austen_continuation"]
COLUMNS = [
    ("ctm_austen_rolling", "bits_per_byte,none", "bpb (rolling)"),
    ("ctm_austen_rolling", "word_perplexity,none", "word ppl"),
    ("ctm_austen_cloze", "acc,none", "cloze acc"),
    ("ctm_austen_cloze", "acc_norm,none", "cloze acc_norm"),
    ("ctm_austen_continuation", "exact_match,first_word", "next-word exact match"),
]


def evaluate_folder(folder: Path, limit: int | None, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=batch_size, device="cpu")
    output = simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(TASK_DIR)), limit=limit)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in output["results"].items()}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder of recipes/run_all.py")
    parser.add_argument("--out", type=Path, default=Path("eval/results/lm_eval_phases"))
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import modeling_ctm  # noqa: F401  (registers the model with the Auto classes)
    from modeling_ctm.hub.publishing import find_phase_checkpoints
    from modeling_ctm.io_ctm import write_text_atomically

    torch.set_num_threads(1)
    phases = {}
    for phase, folder in find_phase_checkpoints(args.run).items():
        started = time.perf_counter()
        phases[phase] = {"folder": str(folder), "results": evaluate_folder(folder, args.limit, args.batch_size)}
        phases[phase]["seconds"] = time.perf_counter() - started
    settings = {"run": str(args.run), "limit": args.limit, "batch_size": args.batch_size, "tasks": TASKS}
    write_text_atomically(args.out / "results.json", json.dumps({"settings": settings, "phases": phases}, indent=2))
    lines = ["| phase | " + " | ".join(title for *_, title in COLUMNS) + " | s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for phase, entry in phases.items():
        cells = []
        for task, key, _ in COLUMNS:
            value = entry["results"].get(task, {}).get(key)
            stderr = entry["results"].get(task, {}).get(key.replace(",", "_stderr,"))
            cells.append("-" if value is None else f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr else ""))
        lines.append(f"| {phase} | " + " | ".join(cells) + f" | {entry['seconds']:.0f} |")
    table = "\n".join(lines)
    write_text_atomically(
        args.out / "results.md",
        f"# lm-eval on the phases of `{args.run}`\n\n{table}\n\nlimit={args.limit} documents per task; "
        "± is lm-eval's bootstrap standard error.\n",
    )
    print(table)


if __name__ == "__main__":
    main()
