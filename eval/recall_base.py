"""Does a token shift let a tiny base model learn in-context recall? MQAR with and without `ctm_token_shift`.

Multi-query associative recall (`modeling_ctm.training.data.recall_rows`): 10 key -> value facts, then the 10 keys
asked in a random order, each followed by its value; chance 0.10. A plain transformer (`ctm_layers="none"`, d=64,
2 layers, 4 heads) is trained from scratch with `CTMTrainer` (AdamW, batch 64, lr 3e-3, linear warm-up then cosine
decay, loss on every token), the same rows and steps in both arms; the seed varies the weights, the rows and their
order. Recall accuracy is the argmax prediction at the queried values of held-out rows (fresh facts), and nothing
else (the facts themselves are random, unpredictable tokens).

Arms:

    no_shift      the reference decoder (`ctm_token_shift="none"`)
    token_shift   each input embedding plus W times the previous token's (`ctm_token_shift="embedding"`)

    python eval/recall_base.py [--seeds 3] [--out eval/results/recall_base] [--quick] [--steps 1000]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


torch.set_num_threads(1)  # tiny tensors; spinning threads on a shared 2-core box cost more than they gain

from harness import (  # noqa: E402
    arms_table,
    experiment_parser,
    experiment_result,
    run_seeds,
    summarize_arms,
    tiny_config,
    train_experiment_model,
    write_results,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMForCausalLM  # noqa: E402
from modeling_ctm.training.data import recall_rows, recall_vocabulary  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


ARMS = {
    "no_shift": "reference decoder, no token shift",
    "token_shift": "ctm_token_shift='embedding': x_t + W x_{t-1}",
}
METRICS = ("recall_accuracy", "train_seconds")
VOCAB_SIZE = 130  # ids 0, 1 reserved; 64 key ids, 64 value ids
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, ctm_layers="none",
             max_position_embeddings=64, vocab_size=VOCAB_SIZE, pad_token_id=0)  # fmt: skip


@dataclass
class Settings:
    seeds: int = 3
    quick: bool = False
    steps: int = 1000
    lr: float = 3e-3
    batch: int = 64
    warmup: int | None = None  # None: steps // 20, at least 1
    pairs: int = 10
    eval_rows: int = 512
    model: dict = field(default_factory=lambda: dict(MODEL))  # CTMConfig fields; each arm sets ctm_token_shift
    chance: float = 0.1

    def __post_init__(self):
        if self.warmup is None:
            self.warmup = max(1, self.steps // 20)


QUICK = dict(quick=True, steps=20, batch=8, eval_rows=32)


@torch.no_grad()
def recall_accuracy(model: CTMForCausalLM, rows, batch: int = 256) -> float:
    """Share of the queried values (`answer_mask`) that the model's argmax names, predicting each from the token
    before it."""
    model.eval()
    hits = total = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        ids, answers = torch.tensor(chunk["input_ids"]), torch.tensor(chunk["answer_mask"]).bool()
        predicted = model(ids).logits[:, :-1].argmax(-1)
        scored = answers[:, 1:]
        hits += int((predicted == ids[:, 1:])[scored].sum())
        total += int(scored.sum())
    return hits / total


def run_arm(arm: str, seed: int, settings: Settings, work: Path) -> dict:
    keys, values = recall_vocabulary(VOCAB_SIZE, first_id=2)
    length, pairs = 4 * settings.pairs, settings.pairs
    train = recall_rows(settings.steps * settings.batch, length, pairs, keys, values, seed=1000 + seed)
    held_out = recall_rows(settings.eval_rows, length, pairs, keys, values, seed=2000 + seed)
    torch.manual_seed(seed)
    shift = "embedding" if arm == "token_shift" else "none"
    started = time.perf_counter()
    model, _ = train_experiment_model(
        CTMTrainer, CTMForCausalLM(tiny_config(settings, ctm_token_shift=shift)), train.remove_columns("answer_mask"),
        work / f"{arm}-{seed}", per_device_train_batch_size=settings.batch, max_steps=settings.steps,
        learning_rate=settings.lr, lr_scheduler_type="cosine", warmup_steps=settings.warmup,
        weight_decay=0.0, logging_steps=10**6, seed=seed, data_seed=seed,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return {"recall_accuracy": recall_accuracy(model, held_out), "train_seconds": seconds}


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, default_out="eval/results/recall_base", settings=Settings, quick=QUICK)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1000; 20 quick)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-3)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    settings = args.settings

    def run_seed(seed: int) -> dict:
        record = {}
        for arm in ARMS:
            record[arm] = run_arm(arm, seed, settings, Path(work))
            print(f"seed {seed} {arm}: {record[arm]}", flush=True)
        return record

    with tempfile.TemporaryDirectory() as work:
        per_seed = run_seeds(settings.seeds, run_seed)
    arms = summarize_arms(per_seed, ARMS, METRICS)
    markdown = (
        "# In-context recall of a tiny base model, with and without a token shift\n\n"
        f"MQAR, {settings.pairs} pairs (chance {settings.chance:.2f}), {settings.steps} steps of batch "
        f"{settings.batch} at lr {settings.lr:g}, {settings.seeds} seed(s); accuracy on the queried values of "
        f"{settings.eval_rows} held-out rows.\n\n" + arms_table(arms, METRICS)
    )
    result = experiment_result(settings, per_seed, arms)
    write_results(args.out, result, markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
