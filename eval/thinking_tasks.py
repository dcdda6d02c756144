"""The thinking suite: tiny synthetic tasks on which iterative computation must pay, and more ticks must win.

Tasks (generated in code; every item is one token; each has a difficulty knob):

    khop    k-hop lookup in context. A random successor function f over `nodes` nodes (one cycle, so the k-th
            successor differs for every k < nodes) is written as one pair token per node, P(a, f(a)), in random order;
            then SEP and `queries` questions "Q(k, x) A_y": start at x, follow k hops, answer y = f^k(x). The loss
            and the accuracy are on the answer tokens only; chance is 1 / nodes. A pair is one token, and so is a
            question, so that a hop is one content lookup with no previous-token circuit needed first (a tiny model
            does not form one within the CPU budget: with the hop count as its own token before Q_x, no arm left
            chance in 600 steps): one attention layer can do one hop, so a plain transformer needs about k layers
            for k hops, and a CTM layer can do one hop per tick. Difficulty: k.
    chain   k hops to a fixed point (`ChainTask`): `chain_chains` chains over `chain_nodes` nodes written as "K_a V_b"
            pairs, each root pointing at itself; questions "K_x A_r" ask x's root. The question does not say how many
            hops to make, and following a root leaves it in place, so more ticks than needed never hurt and a model
            trained at K = 4 can be run at K = 8 (Bansal et al. 2022). Difficulty: x's distance to its root. Chance
            1 / chains.
    parity  running parity (the S2 word problem): a string of bits, and at every position the parity of the bits
            so far. With `ctm_carry="chunk", ctm_chunk_size=1` the CTM's carried state makes the block a recurrence.
            Difficulty: the position (accuracy per position bucket).

Arms (the CTM: one decoder layer whose MLP is a CTM block, `ctm_input_injection="every_tick"`, `ctm_sync_seed="zero"`,
no tick embeddings so that K can change at inference, tick 0 asking with the token's input and every later tick with
the state the tick before left (`ctm_query_source="input_then_state"`), and, by default, the layer's self-attention
silenced so that the block's cross-attention makes every hop (`Settings.block_attention_only`); `Settings.query_source`,
`n_synch_out` and `token_shift` set its query, its readout width and every arm's token shift):

    k1, k2, k4, k8           the CTM trained and run at K = 1, 2, 4, 8 ticks (equal parameters: K adds no weights)
    k4_test_k8               the k4 model run at K = 8 (extrapolation: more thinking time than it trained with)
    transformer_iso_params   a plain transformer (`ctm_layers="none"`) with the layer count whose parameters are
                             closest to the CTM's
    transformer_iso_flops    a plain transformer with the layer count whose forward FLOPs per token are closest to
                             the k4 CTM's (eval/flops.py conventions)
    halting                  the k4 model allowed 8 ticks with `ctm_halt_threshold`: accuracy, and mean ticks used per
                             difficulty (the k8 models trained in 1 of 3 seeds, and those that did never settled to
                             0.9 before their last tick)

khop and chain train every arm on k <= `--train-hops` (uniform, or unlocked in order with `--set curriculum=true`)
and test on k = 1 .. `--test-hops` (chain: at most its longest distance). E2 on the suite: Spearman(selected tick,
difficulty) of the k8 model, with its p-value.

    python eval/thinking_tasks.py [--seeds 3] [--out eval/results/thinking_tasks] [--quick] [--tasks chain,khop,parity]
    # docs/results.md: one process per seed, then one summary
    for s in 0 1 2; do python eval/thinking_tasks.py --seeds 1 --first-seed $s --tasks chain --steps 900 \
        --train-hops 3 --test-hops 4 --set curriculum=true --out eval/results/tt/seed$s & done; wait
    python eval/thinking_tasks.py --merge eval/results/tt/seed0 eval/results/tt/seed1 eval/results/tt/seed2 \
        --out eval/results/thinking_tasks_chain

Writes results.json (`arms`: per task, per arm, `accuracy` per difficulty as {"mean", "sd"} over seeds),
results.md and accuracy.png to --out.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


torch.set_num_threads(1)  # tiny tensors gain nothing from a second thread on a shared 2-core box

import flops  # noqa: E402  (sibling modules: the FLOPs conventions, the summary and pictures)
from datasets import Dataset  # noqa: E402
from harness import (  # noqa: E402
    experiment_parser,
    experiment_training_arguments,
    write_results,
)
from machine import MachineLoad  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from thinking_generators import ChainTask, KHopTask, ParityTask  # noqa: E402  (the tasks)
from thinking_tasks_report import draw, format_markdown, summarize, task_table  # noqa: E402
from transformers import PrinterCallback, set_seed  # noqa: E402

from modeling_ctm import CTMConfig, CTMForCausalLM  # noqa: E402
from modeling_ctm.observers_ctm import CTMTickObserver  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


HOP_TASKS = ("khop", "chain")  # difficulty = hops; trained on k <= train_hops, tested on k = 1 .. test_hops
CTM_TICKS = {"k1": 1, "k2": 2, "k4": 4, "k8": 8}
ARMS = {
    "k1": "CTM, K = 1 tick (the block without thinking time)",
    "k2": "CTM, K = 2",
    "k4": "CTM, K = 4",
    "k8": "CTM, K = 8",
    "k4_test_k8": "the k4 model run at K = 8",
    "transformer_iso_params": "plain transformer, parameters closest to the CTM's",
    "transformer_iso_flops": "plain transformer, forward FLOPs/token closest to the k4 CTM's",
    "halting": "the k4 model allowed 8 ticks, with ctm_halt_threshold",
}


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    hidden_size: int = 64
    heads: int = 4
    layers: int = 1
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    train_hops: int = 4
    test_hops: int = 8
    eval_rows: int = 256
    # sync convergence at which a token stops (the k4 model run at up to 8 ticks): on one seed (2) 0.5 / 0.7 / 0.9 used
    # 3.1-5.5 / 5.5-7.0 / 7.9-8.0 mean ticks from k = 1 to 4, at 0.84 / 0.93 / 0.94 accuracy on k = 4
    halt_threshold: float = 0.7
    parity_length: int = 32
    parity_steps: int = 600
    # khop: hops unlock in order (rows of the first 1/train_hops of training ask k = 1, the next k <= 2, ...), seen
    # in that order (a progressive curriculum: one hop is learned before two are asked)
    curriculum: bool = False
    # chain: nodes, chains and questions per row (chance 1 / chains; distances to a root 1 .. nodes / chains - 1)
    chain_nodes: int = 15
    chain_chains: int = 3
    chain_queries: int = 8
    # the CTM block: pairs read out (S_out; hidden_size // 2 is the package default), what forms its query
    # (`ctm_query_source`), and the token shift of every arm, CTM and transformer alike (`ctm_token_shift`)
    n_synch_out: int = 128
    query_source: str = "input_then_state"
    query_scale: str = "fixed"  # `ctm_query_scale`: "learned" lets a head sharpen its lookup past sqrt(head_dim)
    # the CTM arms' thinking layer without its self-attention (its output projection zeroed and frozen), so the
    # block's cross-attention is the layer's only way across positions: with it, the self-attention learned the first
    # hop and the block never formed a lookup of its own (it attended to the roots; a one-seed probe)
    block_attention_only: bool = True
    token_shift: str = "embedding"


QUICK = dict(steps=30, parity_steps=10, eval_rows=32, batch_size=16, parity_length=16)  # what --quick changes


def base_fields(task, settings: Settings) -> dict:
    return dict(
        vocab_size=task.vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=2 * settings.hidden_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=128,
        ctm_token_shift=settings.token_shift,
    )


def ctm_config(task, settings: Settings, ticks: int) -> CTMConfig:
    carry = {"ctm_carry": "chunk", "ctm_chunk_size": 1} if task.name == "parity" else {}
    return CTMConfig(
        **base_fields(task, settings),
        ctm_layers="last",
        ctm_ticks=ticks,
        ctm_memory_length=4,
        ctm_n_synch_out=settings.n_synch_out,
        ctm_n_synch_action=settings.hidden_size // 2,
        ctm_nlm_hidden_size=8,
        ctm_synapse_depth=2,
        ctm_tick_embeddings=False,
        ctm_input_injection="every_tick",
        ctm_sync_seed="zero",
        ctm_readout_norm="rms",
        ctm_query_source=settings.query_source,
        ctm_query_scale=settings.query_scale,
        **carry,
    )


def transformer_config(task, settings: Settings, layers: int) -> CTMConfig:
    return CTMConfig(**{**base_fields(task, settings), "num_hidden_layers": layers}, ctm_layers="none")


def parameter_count(config: CTMConfig, settings: Settings | None = None) -> int:
    """Trainable parameters: a CTM arm under `settings.block_attention_only` does not count its silenced
    self-attention."""
    with torch.device("meta"):
        model = CTMForCausalLM(config)
    if settings is not None and config.ctm_layer_indices:
        prepare(model, settings)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare(model: CTMForCausalLM, settings: Settings) -> CTMForCausalLM:
    """`block_attention_only`: the thinking layers' self-attention adds exactly nothing and never learns."""
    if settings.block_attention_only:
        for layer in model.model.layers:
            if layer.is_thinking:
                attention = layer.self_attn
                for param in attention.parameters():
                    param.requires_grad_(False)
                if attention.o_proj.weight.device.type != "meta":
                    torch.nn.init.zeros_(attention.o_proj.weight)
    return model


def matched_layers(task, settings: Settings, target: float, measure) -> int:
    """The plain transformer's layer count (1..12) whose `measure(config)` is closest to `target`."""
    return min(range(1, 13), key=lambda n: abs(measure(transformer_config(task, settings, n)) - target))


@contextlib.contextmanager
def thinking_time(model: CTMForCausalLM, ticks: int | None = None, halt_threshold: float | None = None):
    """Run `model`'s thinking blocks at another tick count (tick embeddings off, so any K is defined) and/or with a
    halting threshold, then restore them."""
    blocks = [layer.thinking for layer in model.model.layers if layer.is_thinking]
    saved = [(block.ticks, block.halt_threshold) for block in blocks]
    try:
        for block in blocks:
            block.ticks = ticks if ticks is not None else block.ticks
            block.halt_threshold = halt_threshold
        yield
    finally:
        for block, (k, halt) in zip(blocks, saved):
            block.ticks, block.halt_threshold = k, halt


class TicksUsed(CTMTickObserver):
    """Counts, per position of the last call, the ticks that changed the token (1 + the later ticks it had not halted
    before)."""

    def __init__(self):
        self.used = None

    def on_tick(self, event):
        B, n = event.columns.shape
        if self.used is None:
            self.used = torch.zeros(B, event.sequence_length)
        active = torch.ones(B, n) if event.halted is None else (~event.halted).float()
        self.used.scatter_add_(1, event.columns, active * event.valid.float())


# ----------------------------------------------------------------------------------------------------------------------
# Training and scoring
# ----------------------------------------------------------------------------------------------------------------------


def training_rows(task, settings: Settings, rows: int, seed: int) -> Dataset:
    rng = np.random.default_rng(10_000 + seed)
    if task.name in HOP_TASKS and settings.curriculum:
        stages = np.array_split(np.arange(rows), settings.train_hops)
        parts = [task.sample(len(stage), list(range(1, top + 1)), rng) for top, stage in enumerate(stages, 1)]
        batch = {key: np.concatenate([part[key] for part in parts]) for key in ("input_ids", "labels")}
    elif task.name in HOP_TASKS:
        batch = task.sample(rows, list(range(1, settings.train_hops + 1)), rng)
    else:
        batch = task.sample(rows, rng)
    return Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()})


def train(model: CTMForCausalLM, task, settings: Settings, steps: int, seed: int) -> dict:
    """CTMTrainer on fresh items; returns the wall seconds and the training-loss curve."""
    data = training_rows(task, settings, steps * settings.batch_size, seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = experiment_training_arguments(
            tmp,
            max_steps=steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            weight_decay=0.01,
            seed=seed,
            data_seed=seed,
            logging_steps=max(1, steps // 20),
            remove_unused_columns=False,
            train_sampling_strategy="sequential" if settings.curriculum else "random",
        )
        trainer = CTMTrainer(model=model, args=args, train_dataset=data)
        trainer.remove_callback(PrinterCallback)  # the curve is kept in results.json, not printed per log step
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    curve = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]
    return {"train_seconds": seconds, "curve": curve}


def evaluation_sets(task, settings: Settings) -> dict[int, dict[str, np.ndarray]]:
    """Held-out items (a seed no training run uses): per difficulty for khop, one set for parity."""
    rng = np.random.default_rng(999)
    if task.name in HOP_TASKS:
        hardest = min(settings.test_hops, task.max_hops)
        return {k: task.sample(settings.eval_rows, [k], rng) for k in range(1, hardest + 1)}
    return {0: task.sample(settings.eval_rows, rng)}


@torch.no_grad()
def score(model: CTMForCausalLM, task, sets, ticks_used: bool = False) -> dict:
    """Accuracy per difficulty; with `ticks_used`, the mean ticks the thinking layer used per difficulty; and the
    selected tick with its difficulty (for E2)."""
    model.eval()
    correct, used, selected, difficulty = {}, {}, [], []
    for batch in sets.values():
        ids = torch.as_tensor(batch["input_ids"])
        labels = torch.as_tensor(batch["labels"])
        counter = TicksUsed()
        with model.observing(counter) if ticks_used else contextlib.nullcontext():
            out = model(ids)
        where = labels[:, 1:] != -100  # the prediction for labels[t + 1] is made at t
        hits = (out.logits[:, :-1].argmax(-1) == labels[:, 1:])[where].numpy()
        level = task.difficulty(batch)
        if "scored" in batch:  # items a shortcut could answer are not scored (ChainTask: repeated questions)
            scored = batch["scored"].reshape(-1)
            hits, level = hits[scored], level[scored]
            selected_where = where.clone()
            selected_where[where] = torch.as_tensor(scored)
        else:
            selected_where = where
        for value in np.unique(level):
            correct.setdefault(int(value), []).extend(hits[level == value].tolist())
            if ticks_used:
                ticks = counter.used[:, :-1][selected_where].numpy()
                used.setdefault(int(value), []).extend(ticks[level == value].tolist())
        if out.selected_tick is not None:
            selected.extend(out.selected_tick[:, :-1][selected_where].tolist())
            difficulty.extend(level.tolist())
    result = {"accuracy": {str(k): float(np.mean(v)) for k, v in sorted(correct.items())}}
    if ticks_used:
        result["mean_ticks"] = {str(k): float(np.mean(v)) for k, v in sorted(used.items())}
    result["_selected"] = (selected, difficulty)
    return result


def e2(selected_and_difficulty) -> dict:
    selected, difficulty = selected_and_difficulty
    if len(set(selected)) < 2:
        return {"spearman": None, "p_value": None, "note": "the readout selected one tick for every item"}
    rho, p = spearmanr(selected, difficulty)
    return {"spearman": float(rho), "p_value": float(p)}


def run_seed(task, settings: Settings, seed: int, arms: list[str]) -> dict:
    sets = evaluation_sets(task, settings)
    steps = settings.steps if task.name in HOP_TASKS else settings.parity_steps
    length = task.length
    ctm_params = parameter_count(ctm_config(task, settings, 1), settings)
    k4_flops = flops.model_flops(ctm_config(task, settings, 4), length)["forward"]
    sizes = {
        "transformer_iso_params": matched_layers(task, settings, ctm_params, parameter_count),
        "transformer_iso_flops": matched_layers(
            task, settings, k4_flops, lambda c: flops.model_flops(c, length)["forward"]
        ),
    }
    record, models = {"seed": seed}, {}
    for arm in arms:
        if arm in ("k4_test_k8", "halting"):
            continue
        set_seed(seed)
        if arm in CTM_TICKS:
            config = ctm_config(task, settings, CTM_TICKS[arm])
        else:
            config = transformer_config(task, settings, sizes[arm])
        model = prepare(CTMForCausalLM(config), settings) if arm in CTM_TICKS else CTMForCausalLM(config)
        trained = train(model, task, settings, steps, seed)
        scored = score(model, task, sets)
        models[arm] = model
        record[arm] = {
            "accuracy": scored["accuracy"],
            "parameters": parameter_count(config, settings),
            "layers": config.num_hidden_layers,
            "forward_flops_per_token": flops.model_flops(config, length)["forward"],
            **trained,
        }
        if arm == "k8":
            record["e2"] = e2(scored["_selected"])
    if "k4_test_k8" in arms and "k4" in models:
        with thinking_time(models["k4"], ticks=8):
            record["k4_test_k8"] = {"accuracy": score(models["k4"], task, sets)["accuracy"]}
    if "halting" in arms and "k4" in models:
        with thinking_time(models["k4"], ticks=8, halt_threshold=settings.halt_threshold):
            scored = score(models["k4"], task, sets, ticks_used=True)
        record["halting"] = {"accuracy": scored["accuracy"], "mean_ticks": scored["mean_ticks"]}
    return record


def merge(folders: list[Path], out: Path) -> dict:
    """One result from runs of the same settings over different seeds (`--first-seed`): the per-seed records pooled,
    then summarised, tabulated and drawn as a single run would be."""
    runs = [json.loads((folder / "results.json").read_text()) for folder in folders]
    first = runs[0]
    for folder, run in zip(folders[1:], runs[1:]):
        differ = {k for k in first["settings"] if k not in ("seeds",) and run["settings"].get(k) != first["settings"][k]}
        if differ:
            raise ValueError(f"--merge: {folder} was run with other settings ({sorted(differ)}); merge runs of one setting")
    result = {"settings": {**first["settings"], "seeds": sum(r["settings"]["seeds"] for r in runs)}, "per_seed": {},
              "arms": {}, "e2": {}, "merged_from": [str(f) for f in folders],
              "machine_load": [r.get("machine_load") for r in runs]}  # fmt: skip
    arms = first["settings"]["arms"]
    for name in first["per_seed"]:
        per_seed = sorted((rec for run in runs for rec in run["per_seed"][name]), key=lambda rec: rec["seed"])
        seeds = [rec["seed"] for rec in per_seed]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--merge: seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} appear twice")
        add_task(result, name, per_seed, arms)
    return write(result, out)


def add_task(result: dict, name: str, per_seed: list[dict], arms: list[str]) -> None:
    """A task's per-seed records into `result`, with their summary and E2, and its table printed."""
    result["per_seed"][name] = per_seed
    result["arms"][name] = summarize(per_seed, arms, ARMS)
    result["e2"][name] = [record.get("e2") for record in per_seed]
    print(task_table(name, result["arms"][name], "k" if name in HOP_TASKS else "bits"), flush=True)


def write(result: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    draw(result, out / "accuracy.png")
    write_results(out, result, format_markdown(result))
    return result


def main(argv=None):
    parser = experiment_parser(__doc__, default_out="eval/results/thinking_tasks", settings=Settings, quick=QUICK)
    parser.add_argument("--tasks", default="chain,khop,parity")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=None, help="khop training steps per arm")
    parser.add_argument("--parity-steps", type=int, default=None)
    parser.add_argument("--train-hops", type=int, default=None, help="khop: train on k = 1 .. this")
    parser.add_argument("--test-hops", type=int, default=None, help="khop: test on k = 1 .. this (< nodes)")
    parser.add_argument("--nodes", type=int, default=12, help="khop: nodes of the successor cycle (chance 1/nodes)")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="instead of training: summarise the per-seed records of these earlier --out folders (seeds run in parallel)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    settings = args.settings  # --steps, --parity-steps, --train-hops, --test-hops, --learning-rate: --set shorthands
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms got {unknown}: allowed arms are {list(ARMS)}")
    for arm, needs in {"k4_test_k8": "k4", "halting": "k4"}.items():  # these re-run another arm's model
        if arm in arms and needs not in arms:
            parser.error(f"--arms: {arm} runs the {needs} model, so it needs {needs} in --arms too")
    tasks = {
        "khop": KHopTask(nodes=args.nodes, max_hops=settings.test_hops),
        "chain": ChainTask(nodes=settings.chain_nodes, chains=settings.chain_chains, queries=settings.chain_queries),
        "parity": ParityTask(length=settings.parity_length),
    }
    chosen = args.tasks.split(",")
    if not set(chosen) <= set(tasks):
        parser.error(f"--tasks got {chosen}: allowed tasks are {list(tasks)}")

    load = MachineLoad()
    before = load.sample()
    result = {"settings": {**asdict(settings), "seeds": args.seeds, "arms": arms}, "per_seed": {}, "arms": {}, "e2": {}}
    for name in chosen:
        task = tasks[name]
        per_seed = [run_seed(task, settings, seed, arms) for seed in range(args.first_seed, args.first_seed + args.seeds)]
        add_task(result, name, per_seed, arms)
    result["machine_load"] = load.foreign(before, load.sample())
    return write(result, Path(args.out))


if __name__ == "__main__":
    main()
