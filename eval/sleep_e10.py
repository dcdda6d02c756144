"""E10 + E11: does sleeping (replay the hardest sequences, consolidate on them) beat training longer? And does the
replay heap rotate, or does one nightmare own it?

One checkpoint (a tiny CTM language model trained here on two Austen novels, ~seconds), then compute-matched
continuations with the real `CTMTrainer` + `SleepCallback`, the same optimizer steps, the same data stream (the
Trainer's sampler seeded per seed) and, for the three sleeping arms, the same sleep schedule and replay sampling:

    plain        ordinary training only (the floor: fewer weight updates than the others)
    sleep        + every `every` steps: re-score the heap, dream, consolidate `consolidation_steps` AdamW steps on the
                 replayed sequences with the "hard" token weighting (w_t ~ CE_t / mean CE, capped, mean 1)
    extra_steps  the same extra steps on the same kind of replay batches, spent as ordinary training loss (the model's
                 multi-tick objective): "just training longer", on the hard sequences
    uniform      sleep with uniform consolidation weights (readout CE, w_t = 1)

The consolidation optimizer is a persistent AdamW at the main learning rate in all three sleeping arms, so they differ
only in the loss. Seeds vary the data order and the replay sampling; the checkpoint is the same.

Setting 1 (one domain): continue on Pride and Prejudice. Held-out CE (readout, last blocks of the novel), CE on the
hard sequences the `sleep` arm replayed (the same set scored for every arm of that seed; the injected noise sequence
excluded), ECE of the readout's certainty (1 - normalised entropy, 10 bins) against argmax accuracy.
Setting 2 (a sequence of domains): three novels one after another, the heap carried across; retention matrix
R[i][j] = held-out CE on novel i after stage j; average final CE and forgetting = mean_{i<n} (R[i][n] - R[i][i]).

E11, in the `sleep` arm of setting 1: a noise sequence (uniform random tokens) is injected into the heap at the start
with the reference's nightmare key 15.5. The real heap (re-scored, softmax sampling, replay cap) is compared with a
shadow heap fed the same stream with stale insertion-time keys and greedy top-k dreams (the reference before 65ecbce):
replays of the outlier, max replays of one sequence, Gini of replays, distinct sequences replayed.

Cost: the share of the sleep arm's wall time spent asleep and the heap's memory.

    python eval/sleep_e10.py [--seeds 3] [--out eval/results/sleep_e10] [--quick]
"""

from __future__ import annotations

import copy
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


torch.set_num_threads(1)  # tiny tensors; spinning threads on a shared 2-core box cost more than they gain

from datasets import Dataset  # noqa: E402
from harness import (  # noqa: E402
    experiment_parser,
    format_stat,
    stat,
    timed_training,
    tiny_config,
    write_results,
)
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMForCausalLM  # noqa: E402
from modeling_ctm.memory.sleep import (  # noqa: E402
    ReplayHeap,  # noqa: E402
    SleepCallback,  # noqa: E402
)
from modeling_ctm.training.data import load_austen_novels, split_paragraphs  # noqa: E402
from modeling_ctm.training.tokenization import train_tokenizer  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


ARMS = {"plain": None, "sleep": "hard", "extra_steps": "training_loss", "uniform": "uniform"}
BASE_NOVELS = ("sense_and_sensibility", "persuasion")
DOMAIN = "pride_and_prejudice"
SEQUENCE = ("northanger_abbey", "emma", "mansfield_park")
OUTLIER_KEY = 15.5


@dataclass
class Settings:
    vocab_size: int = 512
    block: int = 48
    batch: int = 8
    chars_per_novel: int = 160_000
    held_out_blocks: int = 32
    base_steps: int = 200
    base_lr: float = 3e-3
    lr: float = 1e-3
    steps: int = 60
    stage_steps: int = 30
    every: int = 10
    capacity: int = 16
    n_dreams: int = 4
    n_random: int = 4
    consolidation_steps: int = 2
    max_replays: int = 3  # at most 3 of the 6 sleeps of setting 1: rescoring alone does not displace unlearnable noise
    # the model: CTMConfig fields (`--set ctm_ticks=3` changes one)
    model: dict = field(default_factory=lambda: dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ctm_layers="last", ctm_ticks=2, ctm_memory_length=4, ctm_n_synch_out=16, ctm_n_synch_action=8,
        ctm_nlm_hidden_size=4, ctm_synapse_depth=2, ctm_readout="most_certain",
    ))  # fmt: skip


QUICK = dict(chars_per_novel=20_000, held_out_blocks=4, base_steps=4, steps=4, stage_steps=2, every=2, capacity=8,
             n_dreams=2, n_random=2, vocab_size=300)  # fmt: skip


# -- data and model ----------------------------------------------------------------------------------------------------


def build_data(s: dict) -> tuple:
    novels = load_austen_novels()
    names = (*BASE_NOVELS, DOMAIN, *SEQUENCE)
    texts = {name: novels[name][: s["chars_per_novel"]] for name in names}
    tokenizer = train_tokenizer([p for name in names for p in split_paragraphs(texts[name])], s["vocab_size"])
    blocks = {}
    for name in names:
        ids = torch.tensor(tokenizer(texts[name])["input_ids"])
        n = ids.numel() // s["block"]
        chunks = ids[: n * s["block"]].view(n, s["block"])
        held = s["held_out_blocks"]
        blocks[name] = {"train": chunks[:-held], "held_out": chunks[-held:]}
    return tokenizer, blocks


def as_dataset(chunks: torch.Tensor) -> Dataset:
    ids = chunks.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(ids[0])] * len(ids), "labels": ids})


def train(model, data: Dataset, steps: int, lr: float, seed: int, out: Path, batch: int, callbacks=()) -> float:
    """Constant-rate training of `model` in place; returns the seconds it took."""
    _, seconds = timed_training(
        CTMTrainer, model, data, out, trainer={"callbacks": list(callbacks)}, per_device_train_batch_size=batch,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=10**6, seed=seed, data_seed=seed,
    )  # fmt: skip
    return seconds


@torch.no_grad()
def evaluate(model, chunks: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """Readout CE (nats/token), ECE of the readout's certainty vs argmax accuracy (10 bins), mean certainty."""
    model.eval()
    ce, certainty, correct = [], [], []
    for start in range(0, chunks.shape[0], batch):
        ids = chunks[start : start + batch]
        out = model(input_ids=ids, use_cache=False)
        logits, targets = out.logits[:, :-1].float(), ids[:, 1:]
        ce.append(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").flatten())
        certainty.append(out.certainty.gather(-1, out.selected_tick[..., None])[:, :-1, 0].flatten())
        correct.append((logits.argmax(-1) == targets).float().flatten())
    model.train()
    ce, certainty, correct = torch.cat(ce), torch.cat(certainty), torch.cat(correct)
    bins = torch.clamp((certainty * 10).long(), max=9)
    ece = sum(
        (bins == b).float().mean() * (certainty[bins == b].mean() - correct[bins == b].mean()).abs()
        for b in range(10)
        if (bins == b).any()
    )
    return {"ce": float(ce.mean()), "ece": float(ece), "certainty": float(certainty.mean()),
            "accuracy": float(correct.mean())}  # fmt: skip


# -- E11 instruments -----------------------------------------------------------------------------------------------------


class RecordingHeap(ReplayHeap):
    """A ReplayHeap that remembers the tokens of everything it replayed (the "replayed hard sequences")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replayed_tokens: dict[int, torch.Tensor] = {}

    def mark_replayed(self, indices):
        for i in indices:
            self.replayed_tokens.setdefault(self.ids[i], self.input_ids[i].clone())
        super().mark_replayed(indices)


class StaleShadow(TrainerCallback):
    """The reference's heap (pre-65ecbce) on the same stream: insertion-time keys, greedy top-k dreams, no cap."""

    def __init__(self, s: dict):
        self.heap = ReplayHeap(s["capacity"], sampling="greedy", max_replays=None, admission="loss")
        self.every, self.n_dreams, self.n_random = s["every"], s["n_dreams"], s["n_random"]

    def on_sequence_losses(self, input_ids, labels, losses, attention_mask=None):
        self.heap.offer(input_ids, labels, losses, attention_mask)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and len(self.heap):
            generator = torch.Generator().manual_seed(state.global_step)
            dreams = self.heap.sample(self.n_dreams, generator)
            self.heap.mark_replayed(dreams + self.heap.sample_others(self.n_random, dreams, generator))


def sleep_callback(s: dict, weighting: str, seed: int) -> SleepCallback:
    callback = SleepCallback(every=s["every"], capacity=s["capacity"], n_dreams=s["n_dreams"], n_random=s["n_random"],
                             weighting=weighting, steps=s["consolidation_steps"], lr=s["lr"],
                             max_replays=s["max_replays"], draw=False, seed=seed, admission="loss")  # fmt: skip
    # E10/E11 measure the hardest-sequence heap (the reference's admission), whatever SleepCallback's default
    callback.heap = RecordingHeap(s["capacity"], max_replays=s["max_replays"], admission="loss")
    return callback


def inject_outlier(heaps, s: dict, seed: int) -> int:
    noise = torch.randint(3, s["vocab_size"], (1, s["block"]), generator=torch.Generator().manual_seed(10_000 + seed))
    for heap in heaps:
        heap.offer(noise, noise, torch.tensor([OUTLIER_KEY]))
    return heaps[0].ids[-1]


# -- the experiment --------------------------------------------------------------------------------------------------


def run(settings: Settings, seeds: int, quick: bool, work: Path) -> dict:
    s = asdict(settings)
    tokenizer, blocks = build_data(s)
    torch.manual_seed(0)
    config = tiny_config(settings, vocab_size=len(tokenizer), max_position_embeddings=2 * s["block"],
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    base = CTMForCausalLM(config)
    base_data = as_dataset(torch.cat([blocks[name]["train"] for name in BASE_NOVELS]))
    base_seconds = train(base, base_data, s["base_steps"], s["base_lr"], 0, work / "base", s["batch"])
    base_state = copy.deepcopy(base.state_dict())

    def fresh_model():
        model = CTMForCausalLM(config)
        model.load_state_dict(base_state)
        return model.train()

    per_seed = {"setting1": [], "setting2": []}
    for seed in range(seeds):
        # setting 1: one domain
        domain = as_dataset(blocks[DOMAIN]["train"])
        rows, hard_set, e11 = {}, None, {}
        for arm in ("sleep", "plain", "extra_steps", "uniform"):  # sleep first: it defines the hard set
            model = fresh_model()
            callbacks = []
            if ARMS[arm] is not None:
                callback = sleep_callback(s, ARMS[arm], seed)
                callbacks.append(callback)
                if arm == "sleep":
                    shadow = StaleShadow(s)
                    callbacks.append(shadow)
                    outlier = inject_outlier([callback.heap, shadow.heap], s, seed)
                else:
                    inject_outlier([callback.heap], s, seed)
            seconds = train(model, domain, s["steps"], s["lr"], seed, work / f"s1-{arm}-{seed}", s["batch"], callbacks)
            if arm == "sleep":
                hard = [t for i, t in callback.heap.replayed_tokens.items() if i != outlier]
                hard_set = torch.stack(hard)
                e11 = {
                    "rescored": {**callback.heap.rotation(), "outlier_replays": callback.heap.replays[outlier]},
                    "stale": {**shadow.heap.rotation(), "outlier_replays": shadow.heap.replays[outlier]},
                    "sleeps": callback.sleeps,
                }
                cost = {
                    "seconds_asleep": callback.seconds_asleep,
                    "wall_seconds": seconds,
                    "share_asleep": callback.seconds_asleep / seconds,
                    "heap_memory_bytes": callback.heap.memory_bytes(),
                    "consolidation_losses": [r["consolidation_losses"] for r in callback.reports],
                    "dream_last": callback.reports[-1]["dream"] if callback.reports else {},
                }
            else:
                cost_other = seconds
            held = evaluate(model, blocks[DOMAIN]["held_out"])
            rows[arm] = {"held_out_ce": held["ce"], "ece": held["ece"], "certainty": held["certainty"],
                         "accuracy": held["accuracy"], "hard_ce": evaluate(model, hard_set)["ce"], "seconds": seconds}  # fmt: skip
        base_model = fresh_model()
        per_seed["setting1"].append({
            "seed": seed, "arms": rows, "e11": e11, "cost": cost, "n_hard": int(hard_set.shape[0]),
            "base": {"held_out_ce": evaluate(base_model, blocks[DOMAIN]["held_out"])["ce"],
                     "hard_ce": evaluate(base_model, hard_set)["ce"]},
        })  # fmt: skip
        del cost_other

        # setting 2: a sequence of domains, the heap carried across stages
        rows2 = {}
        for arm, weighting in ARMS.items():
            model = fresh_model()
            callbacks = [sleep_callback(s, weighting, seed)] if weighting else []
            matrix = []  # matrix[j][i]: CE on novel i after stage j
            for stage, name in enumerate(SEQUENCE):
                train(model, as_dataset(blocks[name]["train"]), s["stage_steps"], s["lr"], seed * 100 + stage,
                      work / f"s2-{arm}-{seed}-{stage}", s["batch"], callbacks)  # fmt: skip
                matrix.append([evaluate(model, blocks[other]["held_out"])["ce"] for other in SEQUENCE])
            R = [[matrix[j][i] for j in range(len(SEQUENCE))] for i in range(len(SEQUENCE))]  # R[i][j]
            last = len(SEQUENCE) - 1
            rows2[arm] = {
                "retention": R,
                "final_mean_ce": statistics.fmean(R[i][last] for i in range(len(SEQUENCE))),
                "forgetting": statistics.fmean(R[i][last] - R[i][i] for i in range(last)),
                "learned_ce": statistics.fmean(R[i][i] for i in range(len(SEQUENCE))),
            }
        per_seed["setting2"].append({"seed": seed, "arms": rows2})

    # aggregate
    arms = {}
    for arm in ARMS:
        entry = {}
        for metric in ("held_out_ce", "hard_ce", "ece", "certainty", "accuracy"):
            values = [row["arms"][arm][metric] for row in per_seed["setting1"]]
            entry[f"s1_{metric}"] = stat(values)
            if arm != "plain":
                diffs = [row["arms"][arm][metric] - row["arms"]["plain"][metric] for row in per_seed["setting1"]]
                entry[f"s1_{metric}_vs_plain"] = stat(diffs)
        for metric in ("final_mean_ce", "forgetting", "learned_ce"):
            values = [row["arms"][arm][metric] for row in per_seed["setting2"]]
            entry[f"s2_{metric}"] = stat(values)
            if arm != "plain":
                diffs = [row["arms"][arm][metric] - row["arms"]["plain"][metric] for row in per_seed["setting2"]]
                entry[f"s2_{metric}_vs_plain"] = stat(diffs)
        arms[arm] = entry
    for metric in ("s1_held_out_ce", "s1_hard_ce", "s1_ece", "s2_final_mean_ce", "s2_forgetting"):
        setting, name = metric.split("_", 1)
        rows_ = per_seed["setting1" if setting == "s1" else "setting2"]
        diffs = [row["arms"]["sleep"][name] - row["arms"]["extra_steps"][name] for row in rows_]
        arms["sleep"][f"{metric}_vs_extra_steps"] = stat(diffs)
    e11 = {
        kind: {key: stat([row["e11"][kind][key] for row in per_seed["setting1"]])
               for key in ("outlier_replays", "max_replays", "max_replay_share", "gini_replays", "distinct_replayed")}
        for kind in ("stale", "rescored")
    }  # fmt: skip
    cost = {key: stat([row["cost"][key] for row in per_seed["setting1"]])
            for key in ("share_asleep", "seconds_asleep", "wall_seconds", "heap_memory_bytes")}  # fmt: skip
    return {
        "experiment": "E10 + E11: sleep vs training longer; replay heap rotation",
        "settings": {**s, "seeds": seeds, "quick": quick, "base_novels": BASE_NOVELS, "domain": DOMAIN,
                     "sequence": SEQUENCE, "base_train_seconds": base_seconds,
                     "machine": f"{platform.machine()} CPU, 1 torch thread, shared 2-core box"},  # fmt: skip
        "arms": arms,
        "e11": e11,
        "cost": cost,
        "per_seed": per_seed,
    }


def arm_rows(arms: dict, setting: str, with_delta: tuple, without: tuple = ()) -> list[str]:
    """One table row per arm: each metric of `with_delta` and its paired difference vs plain ("(control)" for plain
    itself), then the metrics of `without`."""
    rows = []
    for arm, entry in arms.items():
        cells = []
        for metric in with_delta:
            key = f"{setting}_{metric}"
            cells += [format_stat(entry[key]), format_stat(entry[f"{key}_vs_plain"]) if f"{key}_vs_plain" in entry else "(control)"]
        cells += [format_stat(entry[f"{setting}_{metric}"]) for metric in without]
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return rows


def format_markdown(results: dict) -> str:
    arms, s = results["arms"], results["settings"]
    lines = [
        "# E10 + E11: does sleeping beat training longer?",
        "",
        f"One checkpoint ({s['base_steps']} steps on {', '.join(s['base_novels'])}), then {s['steps']} steps on "
        f"{s['domain']} (setting 1) or {s['stage_steps']} steps on each of {', '.join(s['sequence'])} (setting 2); "
        f"sleep every {s['every']} steps, {s['consolidation_steps']} consolidation steps on {s['n_dreams']} dreams + "
        f"{s['n_random']} others; {s['seeds']} seeds (mean ± sd; Δ = paired difference vs plain, lower CE is better). "
        f"{s['machine']}.",
        "",
        "## Setting 1: one domain",
        "",
        "| arm | held-out CE | Δ vs plain | hard-sequence CE | Δ vs plain | ECE | Δ vs plain |",
        "|---|---|---|---|---|---|---|",
        *arm_rows(arms, "s1", ("held_out_ce", "hard_ce", "ece")),
    ]
    base = results["per_seed"]["setting1"]
    lines += [
        "",
        f"Checkpoint before continuing: held-out CE {statistics.fmean(r['base']['held_out_ce'] for r in base):.3f}, "
        f"hard-sequence CE {statistics.fmean(r['base']['hard_ce'] for r in base):.3f}.",
        "",
        "sleep − extra_steps (the compute-matched control): held-out CE "
        f"{format_stat(arms['sleep']['s1_held_out_ce_vs_extra_steps'])}, hard CE {format_stat(arms['sleep']['s1_hard_ce_vs_extra_steps'])}"
        f", ECE {format_stat(arms['sleep']['s1_ece_vs_extra_steps'])}.",
        "",
        "## Setting 2: a sequence of domains (retention)",
        "",
        "| arm | final mean CE | Δ vs plain | forgetting | Δ vs plain | CE right after each stage |",
        "|---|---|---|---|---|---|",
        *arm_rows(arms, "s2", ("final_mean_ce", "forgetting"), ("learned_ce",)),
    ]
    lines += [
        "",
        "sleep − extra_steps: final mean CE "
        f"{format_stat(arms['sleep']['s2_final_mean_ce_vs_extra_steps'])}, forgetting "
        f"{format_stat(arms['sleep']['s2_forgetting_vs_extra_steps'])}.",
        "",
        "## E11: replay heap rotation (sleep arm of setting 1, noise sequence injected with key 15.5)",
        "",
        "| heap | outlier replays | max replays | max share | Gini of replays | distinct replayed |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in (("stale", "stale keys, greedy (reference)"), ("rescored", "re-scored, softmax, cap")):
        e = results["e11"][kind]
        lines.append(f"| {label} | {format_stat(e['outlier_replays'], 1)} | {format_stat(e['max_replays'], 1)} | "
                     f"{format_stat(e['max_replay_share'])} | {format_stat(e['gini_replays'])} | {format_stat(e['distinct_replayed'], 1)} |")  # fmt: skip
    c = results["cost"]
    lines += [
        "",
        f"## Cost\n\nShare of the sleep arm's wall time asleep: {format_stat(c['share_asleep'])} "
        f"({format_stat(c['seconds_asleep'], 2)} s of {format_stat(c['wall_seconds'], 2)} s); heap memory "
        f"{c['heap_memory_bytes']['mean'] / 1024:.1f} KiB ({s['capacity']} sequences of {s['block']} tokens: ids, "
        "labels, mask as int64).",
        "",
    ]
    seconds = {arm: statistics.fmean(row["arms"][arm]["seconds"] for row in base) for arm in arms}
    lines[-1:-1] = [
        "Wall seconds per setting-1 run (training + sleeps, same optimizer steps): "
        + ", ".join(f"{arm} {value:.1f}" for arm, value in seconds.items())
        + " (shared machine: other jobs ran at the same time).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, default_out="eval/results/sleep_e10", quick_seeds=3, settings=Settings, quick=QUICK)
    args = parser.parse_args(argv)
    settings = args.settings
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        results = run(settings, args.seeds, args.quick, Path(work))
    results["settings"]["total_seconds"] = time.perf_counter() - started
    write_results(args.out, results, format_markdown(results))
    print(format_markdown(results))
    return results


if __name__ == "__main__":
    main()
