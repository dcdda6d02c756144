"""E9, episodic warm-start: does a thinking state stored at the end of one conversation, recalled by topic from among
distractors, help a new conversation on the same topic?

Task (synthetic, multi-topic). A topic is a random set of `words_per_topic` words out of a pool of `n_words` (topics
overlap). A conversation is `chunk_length` tokens drawn from its topic's words. Training sequences are two
conversations on the same topic, one chunk each, with the attention cut between them (E5's `ContinuityTrainer`):

    conversation 1:  w w STORE v w w ...            (v one of `n_values` value tokens, independent of the topic)
    conversation 2:  w w w ... w RECALL v           (loss on every token of conversation 2)

so the model learns to carry into conversation 2 what conversation 1 was about (its words: a lower loss on the first
tokens) and the value stored in it (the answer after RECALL, E5's recall).

Protocol per seed (one model trained in the script, `ctm_carry="chunk"`, chunk = one conversation):

1. conversation A of every topic (`n_topics` of them) runs from a fresh state; its thinking state is stored in a
   `CTMEpisodicMemory` (key: the mean input embedding of A) - the target episode and `n_topics - 1` distractors;
2. new conversations B on each topic (none of A's text in the context) start from
   (a) `recalled`: `memory.recall(model, opening of B, threshold)` - the opening is B's first `query_tokens` tokens;
   (b) `fresh`: the learned start state; (c) `wrong`: a stored snapshot of another topic (placebo);
   (d) `oracle`: conversation A's own carried cache (attention dropped: the state only), without the memory;
   and, Larimar-style, (e) `forgotten`: `recall` after A's episode was erased with `forget` (the effect must go).
3. Metrics per arm: the mean CE of B's first `first_tokens` predicted tokens (the opening included: it is the text
   a real user types first), and the accuracy/NLL of v after RECALL (the value stored in A: cross-conversation
   recall, chance 1/n_values). Retrieval: top-1 accuracy of `search` (the best episode is A) and the share of
   queries above the threshold.

Success (reference E9): recalled < fresh in first-token loss, wrong >= fresh, recalled close to oracle; recall
accuracy of (a) well above chance. Since a stored state is returned bit-exactly, (a) equals (d) on every query whose
retrieval is right: the gap between them is the retrieval error.

Cost: bytes per episode for the tiny and gpu presets (recipes/presets/*.yaml), and store/recall time per call with
10,000 episodes in memory at the tiny preset shape.

    python eval/episodic_e9.py [--seeds 3] [--out eval/results/e9] [--quick] [--set FIELD=VALUE ...]
"""

from __future__ import annotations

import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


torch.set_num_threads(1)  # tiny tensors; a busy shared CPU makes extra threads a loss

import continuity_e5 as e5  # noqa: E402  (E5's task pieces, model and trainer: a sibling module)
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from datasets import Dataset  # noqa: E402
from harness import (  # noqa: E402
    arms_table,
    experiment_parser,
    experiment_result,
    finish_experiment,
    mean_sd,
    run_seeds,
    summarize_arms,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMConfig, CTMEpisodicMemory, CTMForCausalLM  # noqa: E402
from modeling_ctm.cache_ctm import CTMCache  # noqa: E402


PAD, STORE, RECALL, FIRST_VALUE = e5.PAD, e5.STORE, e5.RECALL, e5.FIRST_VALUE
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Settings(e5.Settings):
    # task (the E5 fields chunk_length, n_values, model and training fields are reused)
    chunk_length: int = 16
    n_values: int = 8
    n_words: int = 48
    words_per_topic: int = 6
    n_topics: int = 64  # one stored episode per topic: 1 target + n_topics - 1 distractors
    queries_per_topic: int = 8
    query_tokens: int = 6
    first_tokens: int = 6
    threshold: float = 0.3
    capacity: int = 128
    lm_labels: str = "all"  # conversation 2's LM targets: "all" tokens, or only the "first" ones + the RECALL answer
    # training (E5's defaults otherwise); the model is E5's `model` dict (--set hidden_size=48 changes it)
    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 3e-3
    # cost
    timing_episodes: int = 10_000
    timing_calls: int = 30

    def __post_init__(self):
        self.vocab_size = FIRST_VALUE + self.n_values + self.n_words

    @property
    def first_word(self) -> int:
        return FIRST_VALUE + self.n_values

    def validate(self):
        if self.words_per_topic > self.n_words or self.words_per_topic < 2:
            raise ValueError(f"words_per_topic={self.words_per_topic} is invalid: allowed 2..n_words={self.n_words}")
        if self.n_topics < 2:
            raise ValueError(f"n_topics={self.n_topics} is invalid: allowed values are integers >= 2")
        if not 1 <= self.first_tokens <= self.chunk_length - 3:
            raise ValueError(f"first_tokens={self.first_tokens} is invalid: allowed 1..chunk_length-3")
        if not 1 <= self.query_tokens <= self.chunk_length - 2:
            raise ValueError(f"query_tokens={self.query_tokens} is invalid: allowed 1..chunk_length-2")
        if self.lm_labels not in ("all", "first"):
            raise ValueError(f"lm_labels={self.lm_labels!r} is invalid: allowed values are 'all', 'first'")
        if self.capacity < self.n_topics:
            raise ValueError(f"capacity={self.capacity} is invalid: it must hold n_topics={self.n_topics} episodes")


QUICK = dict(
    steps=4, batch_size=8, n_topics=8, queries_per_topic=2, seeds=1, warmup_steps=0, timing_episodes=300, timing_calls=3
)


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


def make_topics(settings: Settings, seed: int) -> torch.Tensor:
    """(n_topics, words_per_topic) word tokens: each topic a random subset of the pool."""
    generator = torch.Generator().manual_seed(50_000 + seed)
    return torch.stack(
        [
            settings.first_word + torch.randperm(settings.n_words, generator=generator)[: settings.words_per_topic]
            for _ in range(settings.n_topics)
        ]
    )


def conversations(settings, topics, topic_ids, generator, values=None, role="store"):
    """One conversation per entry of `topic_ids`. role 'store': STORE v at a random position (v drawn unless given);
    role 'recall': ends with RECALL v. Returns (ids (B, L), values (B,))."""
    L, n = settings.chunk_length, topic_ids.shape[0]
    pick = torch.randint(settings.words_per_topic, (n, L), generator=generator)
    ids = topics[topic_ids][torch.arange(n)[:, None], pick]
    if values is None:
        values = FIRST_VALUE + torch.randint(settings.n_values, (n,), generator=generator)
    rows = torch.arange(n)
    if role == "store":
        at = 1 + torch.randint(L - 2, (n,), generator=generator)  # STORE at 1..L-2, v right after it
        ids[rows, at] = STORE
        ids[rows, at + 1] = values
    else:
        ids[:, L - 2] = RECALL
        ids[:, L - 1] = values
    return ids, values


def make_dataset(settings: Settings, topics: torch.Tensor, n: int, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(60_000 + seed)
    topic_ids = torch.randint(settings.n_topics, (n,), generator=generator)
    first, values = conversations(settings, topics, topic_ids, generator, role="store")
    second, _ = conversations(settings, topics, topic_ids, generator, values=values, role="recall")
    ids = torch.cat([first, second], 1)
    targets = second.clone()
    if settings.lm_labels == "first":  # fewer word targets: the RECALL answer weighs more in the mean loss
        targets[:, settings.first_tokens + 1 : settings.chunk_length - 1] = -100
    labels = torch.cat([torch.full_like(first, -100), targets], 1)  # the loss is on conversation 2
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def train(settings: Settings, topics: torch.Tensor, seed: int) -> tuple[CTMForCausalLM, list[dict]]:
    dataset = make_dataset(settings, topics, settings.steps * settings.batch_size, seed)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = e5.make_trainer(settings, seed, gradient_window=1, output_dir=output_dir, train_dataset=dataset)
        trainer.train()
    losses = [
        {"step": log["step"], "loss": round(log["loss"], 4)} for log in trainer.state.log_history if "loss" in log
    ]
    return trainer.model.eval(), losses


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


METRICS = ("first_token_loss", "recall_accuracy", "recall_nll")
ARMS = {
    "recalled": "memory.recall(opening of B) among the distractors",
    "fresh": "learned start state (no memory)",
    "wrong": "a stored snapshot of another topic (placebo)",
    "oracle": "A's own carried cache, attention dropped (no memory)",
    "forgotten": "memory.recall after A's episode was forgotten",
}


@torch.no_grad()
def arm_metrics(model, settings, ids, answers, cache) -> dict[str, torch.Tensor]:
    """Per-row first-token CE, recall correctness and recall NLL of conversations `ids` started from `cache`."""
    logits = model(ids, cache=cache, use_cache=True).logits.float()
    k = settings.first_tokens
    first = F.cross_entropy(logits[:, :k].transpose(1, 2), ids[:, 1 : k + 1], reduction="none").mean(1)
    recall_logits = logits[:, settings.chunk_length - 2]
    nll = -torch.log_softmax(recall_logits, -1).gather(1, answers[:, None])[:, 0]
    correct = (recall_logits.argmax(-1) == answers).float()
    return {"first_token_loss": first, "recall_correct": correct, "recall_nll": nll}


def or_fresh(cache: CTMCache | None, config) -> CTMCache:
    """`recall` returns None when no row reaches the threshold: the conversation then starts fresh."""
    return cache if cache is not None else CTMCache(config)


@torch.no_grad()
def evaluate(model: CTMForCausalLM, settings: Settings, topics: torch.Tensor, seed: int) -> dict:
    config = model.config
    generator = torch.Generator().manual_seed(70_000 + seed)
    n = settings.n_topics
    all_topics = torch.arange(n)
    stored_ids, stored_values = conversations(settings, topics, all_topics, generator, role="store")
    carried = model(stored_ids, cache=CTMCache(config), use_cache=True).cache
    carried.drop_attention_()
    memory = CTMEpisodicMemory.for_model(config, capacity=settings.capacity)
    slots = memory.store(model, stored_ids, carried, metadata=[{"topic": t} for t in range(n)])
    slot_topic = {slot: entry["topic"] for slot, entry in memory.episode_metadata.items()}
    states = carried.thinking_state_dict()  # row t: the end of conversation A on topic t

    query_topics = all_topics.repeat_interleave(settings.queries_per_topic)
    answers = stored_values[query_topics]
    ids, _ = conversations(settings, topics, query_topics, generator, values=answers, role="recall")
    opening = ids[:, : settings.query_tokens]

    scores, found = memory.search(model, opening)
    retrieved = torch.tensor([slot_topic.get(int(s), -1) for s in found])
    hit = scores >= settings.threshold

    oracle = copy.deepcopy(carried)
    oracle.batch_select_indices(query_topics)
    shift = 1 + torch.randint(n - 1, query_topics.shape, generator=generator)
    wrong_topics = (query_topics + shift) % n
    caches = {
        "recalled": or_fresh(memory.recall(model, opening, threshold=settings.threshold), config),
        "fresh": CTMCache(config),
        "wrong": CTMCache.from_thinking_state(config, {k: v[wrong_topics] for k, v in states.items()}),
        "oracle": oracle,
    }
    rows = {arm: arm_metrics(model, settings, ids, answers, cache) for arm, cache in caches.items()}

    # forgotten: for the queries of each topic, the same memory without that topic's episode
    pieces = []
    for topic in range(n):
        select = (query_topics == topic).nonzero().flatten()
        without = copy.deepcopy(memory)
        without.forget(slots[topic])
        cache = or_fresh(without.recall(model, opening[select], threshold=settings.threshold), config)
        pieces.append((select, arm_metrics(model, settings, ids[select], answers[select], cache)))
    forgotten = {metric: torch.zeros(len(query_topics)) for metric in rows["fresh"]}
    for select, metrics in pieces:
        for metric, values in metrics.items():
            forgotten[metric][select] = values
    rows["forgotten"] = forgotten

    # per arm: means over queries
    arms = {
        arm: {
            "first_token_loss": float(metrics["first_token_loss"].mean()),
            "recall_accuracy": float(metrics["recall_correct"].mean()),
            "recall_nll": float(metrics["recall_nll"].mean()),
        }
        for arm, metrics in rows.items()
    }
    correct = retrieved == query_topics
    return {
        "arms": arms,
        "retrieval_top1": float(correct.float().mean()),
        "retrieval_hit_rate": float(hit.float().mean()),
        "retrieval_top1_above_threshold": float((correct & hit).float().mean()),
        "mean_best_score": float(scores.mean()),
        "episodes_stored": len(memory),
        "distractors": len(memory) - 1,
        "queries": int(query_topics.shape[0]),
        # on correctly retrieved queries the recalled arm must equal the oracle exactly (bit-exact store)
        "recalled_vs_oracle_max_abs_on_correct": float(
            (rows["recalled"]["first_token_loss"] - rows["oracle"]["first_token_loss"])[correct & hit].abs().max()
        )
        if bool((correct & hit).any())
        else math.nan,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------------------------------


def preset_config(name: str) -> CTMConfig:
    """The CTMConfig of a recipe preset's phase-3 model (decoder + thinking fields + chunk carry)."""
    preset = yaml.safe_load((REPO / "recipes" / "presets" / f"{name}.yaml").read_text())
    return CTMConfig(
        vocab_size=preset["data"]["tokenizer_vocab_size"],
        **preset["model"],
        **{k: v for k, v in preset["thinking"].items() if k != "ctm_tick_checkpointing"},
        ctm_carry="chunk",
        ctm_chunk_size=preset["phase3"]["chunk_size"],
    )


@torch.no_grad()
def cost(settings: Settings) -> dict:
    out = {"bytes_per_episode": {}}
    for name in ("tiny", "gpu"):
        config = preset_config(name)
        out["bytes_per_episode"][name] = CTMEpisodicMemory.for_model(config, capacity=1).bytes_per_episode
    config = preset_config("tiny")
    torch.manual_seed(0)
    model = CTMForCausalLM(config).eval()
    n = settings.timing_episodes
    memory = CTMEpisodicMemory.for_model(config, capacity=n)
    generator = torch.Generator().manual_seed(0)
    batch = 100 if n >= 100 else n
    ids = torch.randint(config.vocab_size, (batch, 8), generator=generator)
    cache = model(ids, use_cache=True).cache
    start = time.perf_counter()
    while len(memory) < n:  # distinct random texts: keys far apart, so every store takes a free slot
        memory.store(model, torch.randint(config.vocab_size, (batch, 8), generator=generator), cache)
    fill_seconds = time.perf_counter() - start
    query = torch.randint(config.vocab_size, (1, 32), generator=generator)
    one_cache = model(query, use_cache=True).cache

    def per_call(fn):
        fn()
        times = []
        for _ in range(settings.timing_calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out.update(
        {
            "timing_preset": "tiny",
            "episodes_in_memory": len(memory),
            "memory_bytes_held": sum(b.numel() * b.element_size() for b in memory.buffers()),
            "store_ms_per_call": 1e3 * per_call(lambda: memory.store(model, query, one_cache)),
            "recall_ms_per_call": 1e3 * per_call(lambda: memory.recall(model, query, threshold=-1.0)),
            "search_ms_per_call": 1e3 * per_call(lambda: memory.search(model, query)),
            "fresh_cache_ms_per_call": 1e3 * per_call(lambda: CTMCache(config)),
            "fill_seconds": fill_seconds,
        }
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def run(settings: Settings, out_dir: Path | None, log=print) -> dict:
    settings.validate()
    start = time.time()

    def run_seed(seed: int) -> dict:
        t0 = time.time()
        topics = make_topics(settings, seed)
        model, losses = train(settings, topics, seed)
        record = {**evaluate(model, settings, topics, seed), "train_loss": losses}
        record["train_seconds"] = round(time.time() - t0, 1)
        arms = record["arms"]
        log(
            f"seed {seed}: retrieval top-1 {record['retrieval_top1']:.3f} ({record['distractors']} distractors); "
            + "; ".join(
                f"{arm} loss {m['first_token_loss']:.3f} acc {m['recall_accuracy']:.3f}" for arm, m in arms.items()
            )
            + f" ({record['train_seconds']:.0f}s)"
        )
        return record

    per_seed = run_seeds(settings.seeds, run_seed)
    summary = summarize_arms([r["arms"] for r in per_seed], ARMS, METRICS)
    retrieval = {}
    for metric in ("retrieval_top1", "retrieval_hit_rate", "retrieval_top1_above_threshold", "mean_best_score"):
        m, s = mean_sd([r[metric] for r in per_seed])
        retrieval[metric] = {"mean": m, "sd": s}
    costs = cost(settings)
    result = experiment_result(
        settings,
        per_seed,
        summary,
        experiment="E9 episodic warm-start: a recalled thinking state starts a new conversation on the same topic",
        chance_recall_accuracy=1.0 / settings.n_values,
        distractors=per_seed[0]["distractors"],
        retrieval=retrieval,
        cost=costs,
        wall_seconds=round(time.time() - start, 1),
        machine=f"{platform.machine()}, torch threads {torch.get_num_threads()}",
    )
    table = format_table(result)
    finish_experiment(out_dir, result, format_markdown(result, table), log, shown=table)
    return result


def format_table(result: dict) -> str:
    r, c = result["retrieval"], result["cost"]
    lines = [
        f"{len(result['per_seed'])} seed(s)",
        f"chance recall accuracy {result['chance_recall_accuracy']:.3f}; retrieval top-1 "
        f"{r['retrieval_top1']['mean']:.3f} ± {r['retrieval_top1']['sd']:.3f} among {result['distractors']} "
        f"distractors (above threshold {r['retrieval_hit_rate']['mean']:.3f})",
        f"bytes/episode: tiny {c['bytes_per_episode']['tiny']:,}, gpu {c['bytes_per_episode']['gpu']:,}; with "
        f"{c['episodes_in_memory']:,} episodes ({c['memory_bytes_held'] / 2**20:.1f} MiB): store "
        f"{c['store_ms_per_call']:.2f} ms, recall {c['recall_ms_per_call']:.2f} ms per call",
    ]
    return "\n".join(lines)


def format_markdown(result: dict, table: str) -> str:
    s = result["settings"]
    r, c = result["retrieval"], result["cost"]
    return f"""# E9 episodic warm-start

{s["n_topics"]} topics ({s["words_per_topic"]} of {s["n_words"]} words each); one stored episode per topic
(conversation A, {s["chunk_length"]} tokens): the target plus {result["distractors"]} distractors. New conversations B
({s["queries_per_topic"]} per topic) retrieve with their first {s["query_tokens"]} tokens (threshold {s["threshold"]});
first-token CE over B's first {s["first_tokens"]} predictions; recall = the value stored in A, asked at the end of B
(chance {result["chance_recall_accuracy"]:.3f}). {len(result["per_seed"])} seeds, {s["steps"]} steps of batch
{s["batch_size"]}. Wall time {result["wall_seconds"]:.0f} s.

Arms (the start state of B; first-token CE, recall accuracy, recall NLL):

{arms_table(result["arms"], METRICS)}

Retrieval top-1 {r["retrieval_top1"]["mean"]:.3f} ± {r["retrieval_top1"]["sd"]:.3f} among {result["distractors"]}
distractors; share above the threshold {r["retrieval_hit_rate"]["mean"]:.3f} ± {r["retrieval_hit_rate"]["sd"]:.3f};
mean best cosine {r["mean_best_score"]["mean"]:.3f}.

Cost: {c["bytes_per_episode"]["tiny"]:,} bytes per episode at the tiny preset shape,
{c["bytes_per_episode"]["gpu"]:,} at the gpu preset shape. With {c["episodes_in_memory"]:,} episodes at the tiny
shape ({c["memory_bytes_held"] / 2**20:.1f} MiB held): store {c["store_ms_per_call"]:.2f} ms, recall
{c["recall_ms_per_call"]:.2f} ms (search alone {c["search_ms_per_call"]:.2f} ms; a fresh cache
{c["fresh_cache_ms_per_call"]:.3f} ms) per call of one row, median of {s["timing_calls"]}. Decoding from a recalled
state costs the same per token as from a fresh one (the same forward). Settings: `{json.dumps(s)}`

```
{table}
```
"""


def main(argv=None):
    hf_logging.set_verbosity_error()
    parser = experiment_parser(__doc__, default_out="eval/results/e9", settings=Settings, quick=QUICK)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per seed")
    args = parser.parse_args(argv)
    run(args.settings, args.out)


if __name__ == "__main__":
    sys.exit(main())
