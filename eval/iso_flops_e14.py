"""E14: depth against thinking time, and all-layer against last-layer thinking, at equal FLOPs (CPU scale).

The seed's open question ("depth beats thinking time and i don't fully know why") asked with compute-matched
controls. Every arm is trained from scratch (`CTMTrainer`) on the same offline data as eval/thinking_pays.py (Austen,
packed blocks), with the same batches in the same order for a given seed, the same number of optimizer steps (so the
same tokens seen) and the same constant learning rate after a short warm-up: with no decay, an evaluation point in
the middle of a run is a fair stand-in for a shorter run, which the equal-FLOPs comparison needs.

    mlp_4l          4 plain decoder layers (phase-1 style, `ctm_layers="none"`): the "depth" control
    ctm_4l_all_k2   4 layers, every MLP replaced by a CTM block thinking K=2 ticks (8 block-ticks)
    ctm_2l_all_k4   2 layers, every MLP replaced by a CTM block thinking K=4 ticks (8 block-ticks): half the depth,
                    twice the thinking time - against ctm_4l_all_k2 this is depth vs thinking time
    ctm_4l_last_k2  4 layers, only the last layer thinks (K=2), the other three keep their MLPs: against
                    ctm_4l_all_k2 this is last-layer vs all-layer

The CTM arms use the seed's replacement (`ctm_mlp="replace"`) and the tiny preset's objective and served readout: the
CE of the tick mixture (`ctm_readout="tick_mixture"`) plus 0.1 x the mean per-tick CE.

Per arm: analytic training FLOPs per token (eval/flops.py, 3 x forward at the block length); held-out CE (nats/token,
of the served logits, on packed held-out blocks) every `eval_every` steps, with the training wall time up to that point
(evaluation time excluded) and the fraction of the CPUs other processes used meanwhile (`MachineLoad`); from that
curve:

* `final_ce`: at the end (same tokens seen by every arm);
* `ce_at_equal_flops`: at the FLOP budget of the cheapest arm's end (cumulative training FLOPs = steps x batch x block
  x FLOPs/token), read off each arm's curve by linear interpolation between evaluation points;
* `ce_at_equal_wall`: at the shortest arm's training wall time of the same seed, interpolated the same way (wall times
  on a shared machine: the load is recorded next to them);
* `repetition_4gram`: the fraction of repeated 4-grams in `new_tokens` greedy tokens (`model.generate`, EOS
  suppressed) from fixed held-out prompts: a 4-gram counts as repeated when it already occurred earlier in the same
  continuation.

    python eval/iso_flops_e14.py [--seeds 3] [--out eval/results/iso_flops_e14] [--quick] [--steps N]

Writes results.json (with the `arms` object and every seed's curves), results.md (the table and the answer) and
ce_vs_flops.png (held-out CE against training FLOPs and against wall time, mean ± sd over seeds).
"""

from __future__ import annotations

import io
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


torch.set_num_threads(1)  # tiny tensors gain nothing from a second thread on a shared 2-core box

import flops  # noqa: E402  (eval/flops.py, a sibling module)
from harness import (  # noqa: E402
    arms_table,
    austen_blocks,
    experiment_parser,
    experiment_result,
    experiment_training_arguments,
    format_mean_sd,
    mean_sd,
    summarize_arms,
    tiny_config,
    write_results,
)
from machine import MachineLoad  # noqa: E402
from transformers import TrainerCallback, TrainingArguments, set_seed  # noqa: E402

from modeling_ctm import CTMConfig, CTMForCausalLM  # noqa: E402
from modeling_ctm.io_ctm import atomic_write  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


# name -> (decoder layers, ctm_layers, ticks), description
ARMS = {
    "mlp_4l": "4 plain layers (no thinking): the depth control",
    "ctm_4l_all_k2": "4 layers, all think, K=2",
    "ctm_2l_all_k4": "2 layers, all think, K=4 (half the depth, twice the ticks)",
    "ctm_4l_last_k2": "4 layers, only the last thinks, K=2",
}
SHAPES = {
    "mlp_4l": (4, "none", 1),
    "ctm_4l_all_k2": (4, "all", 2),
    "ctm_2l_all_k4": (2, "all", 4),
    "ctm_4l_last_k2": (4, "last", 2),
}
METRICS = (
    "final_ce",
    "ce_at_equal_flops",
    "ce_at_equal_wall",
    "repetition_4gram",
    "flops_per_token_training",
    "train_seconds",
    "foreign_load",
    "parameters",
)


@dataclass
class Settings:
    steps: int = 200  # optimizer steps of every arm (same tokens seen)
    batch_size: int = 16
    block_size: int = 64
    vocab_size: int = 2048
    hidden_size: int = 48
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 20
    eval_blocks: int = 48
    prompts: int = 8
    prompt_length: int = 16
    new_tokens: int = 64

    def config(self, arm: str, tokenizer) -> CTMConfig:
        layers, ctm_layers, ticks = SHAPES[arm]
        return tiny_config(
            self,
            vocab_size=len(tokenizer),
            num_hidden_layers=layers,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            ctm_layers=ctm_layers,
            ctm_ticks=ticks,
            ctm_mlp="replace",
            ctm_memory_length=8,
            ctm_n_synch_out=32,
            ctm_n_synch_action=16,
            ctm_nlm_hidden_size=8,
            ctm_synapse_depth=4,
            ctm_attention_heads=2,
            ctm_readout="tick_mixture",
            ctm_loss_mixture_weight=1.0,
            ctm_loss_argmin_weight=0.0,
            ctm_loss_certain_weight=0.0,
            ctm_loss_tick_aux_weight=0.1,
        )


QUICK = dict(steps=4, batch_size=4, block_size=32, vocab_size=512, hidden_size=32, intermediate_size=64,
             eval_every=2, eval_blocks=4, prompts=2, prompt_length=8, new_tokens=12, warmup_steps=1)  # fmt: skip


def training_flops_per_token(config: CTMConfig, settings: Settings) -> float:
    return flops.ctm_flops(config, settings.block_size)["training"]


# -- data --------------------------------------------------------------------------------------------------------------


def load_data(settings: Settings, cache_dir: Path):
    """The same offline data as eval/thinking_pays.py (`austen_blocks`): Austen's novels packed into blocks,
    Persuasion held out; the first `eval_blocks` held-out blocks are scored, the next ones give the prompts."""
    _, tokenizer, train, held_out = austen_blocks(settings.vocab_size, settings.block_size, cache_dir)
    blocks = torch.tensor(held_out["input_ids"][: settings.eval_blocks])
    # prompts: the first tokens of held-out blocks that do not overlap the scored ones
    rest = held_out["input_ids"][settings.eval_blocks : settings.eval_blocks + settings.prompts]
    prompts = torch.tensor([row[: settings.prompt_length] for row in rest])
    return tokenizer, train, blocks, prompts


# -- measuring ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def held_out_ce(model: CTMForCausalLM, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token CE (nats/token) of the logits the model serves (its `ctm_readout`) on held-out blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def repeated_ngram_fraction(tokens: list[int], n: int = 4) -> float:
    """Fraction of the n-grams of `tokens` that already occurred earlier in `tokens`."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeated = set(), 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams)


@torch.no_grad()
def generation_repetition(model: CTMForCausalLM, prompts: torch.Tensor, new_tokens: int) -> float:
    """Mean over prompts of the repeated-4-gram fraction of `new_tokens` greedy tokens (EOS suppressed, so every
    continuation has the same length)."""
    model.eval()
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
    continuations = out[:, prompts.shape[1] :].tolist()
    return sum(repeated_ngram_fraction(row) for row in continuations) / len(continuations)


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """y at x on the piecewise-linear curve through (xs, ys) (xs increasing); x beyond the last point is refused."""
    if x > xs[-1] * (1 + 1e-9) or x < xs[0]:
        raise ValueError(f"x={x} is outside the curve's range [{xs[0]}, {xs[-1]}]")
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


class HeldOutCurve(TrainerCallback):
    """Held-out CE at step 0 and every `every` steps (and the last), with the training wall time so far (the
    evaluations' own time excluded) and the foreign CPU load since the previous point."""

    def __init__(self, blocks: torch.Tensor, every: int, tokens_per_step: int, flops_per_token: float):
        self.blocks, self.every = blocks, every
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.load = MachineLoad()
        self.points: list[dict] = []

    def _evaluate(self, step: int, model) -> None:
        now = time.perf_counter()
        train_seconds = now - self.started - self.eval_seconds
        sample = self.load.sample()
        foreign = self.load.foreign(self.last_sample, sample) if self.points else None
        ce = held_out_ce(model, self.blocks)
        self.points.append(
            {
                "step": step,
                "tokens": step * self.tokens_per_step,
                "training_flops": step * self.tokens_per_step * self.flops_per_token,
                "train_seconds": train_seconds,
                "foreign_load": foreign,
                "ce": ce,
            }
        )
        self.eval_seconds += time.perf_counter() - now
        self.last_sample = self.load.sample()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.started, self.eval_seconds, self.last_sample = time.perf_counter(), 0.0, None
        self._evaluate(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._evaluate(state.global_step, model)


def arguments(settings: Settings, seed: int, output_dir: str) -> TrainingArguments:
    return experiment_training_arguments(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant_with_warmup",  # no decay: a point mid-run stands in for a shorter run
        warmup_steps=settings.warmup_steps,
        weight_decay=0.01,
        seed=seed,
        data_seed=seed,  # the same batches in the same order for every arm of a seed
        eval_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
    )


def run_arm(arm: str, seed: int, settings: Settings, tokenizer, train_set, blocks, prompts) -> dict:
    set_seed(1000 + seed)
    config = settings.config(arm, tokenizer)
    model = CTMForCausalLM(config)
    per_token = training_flops_per_token(config, settings)
    curve = HeldOutCurve(blocks, settings.eval_every, settings.batch_size * settings.block_size, per_token)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = CTMTrainer(
            model=model, args=arguments(settings, seed, tmp), train_dataset=train_set, callbacks=[curve]
        )
        trainer.train()
    loads = [p["foreign_load"] for p in curve.points if p["foreign_load"] is not None]
    return {
        "final_ce": curve.points[-1]["ce"],
        "flops_per_token_training": per_token,
        "train_seconds": curve.points[-1]["train_seconds"],
        "foreign_load": sum(loads) / len(loads) if loads else float("nan"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "repetition_4gram": generation_repetition(model, prompts, settings.new_tokens),
        "curve": curve.points,
    }


# -- the experiment ----------------------------------------------------------------------------------------------------


def compare(per_seed: list[dict]) -> tuple[float, list[float]]:
    """Fill `ce_at_equal_flops` and `ce_at_equal_wall` into every arm of every seed. Returns the FLOP budget (the
    cheapest arm's end) and each seed's wall budget (its shortest arm's training time)."""
    budget = min(record[arm]["curve"][-1]["training_flops"] for record in per_seed for arm in ARMS)
    walls = []
    for record in per_seed:
        wall = min(record[arm]["curve"][-1]["train_seconds"] for arm in ARMS)
        walls.append(wall)
        for arm in ARMS:
            points = record[arm]["curve"]
            ces = [p["ce"] for p in points]
            record[arm]["ce_at_equal_flops"] = interpolate([p["training_flops"] for p in points], ces, budget)
            record[arm]["ce_at_equal_wall"] = interpolate([p["train_seconds"] for p in points], ces, wall)
    return budget, walls


def beats(arms: dict, a: str, b: str, metric: str) -> bool:
    """a is lower than b by more than the sum of their sds over seeds."""
    return arms[a][f"{metric}_mean"] < arms[b][f"{metric}_mean"] - arms[a][f"{metric}_sd"] - arms[b][f"{metric}_sd"]


def verdict(arms: dict, a: str, b: str, metric: str) -> str:
    if beats(arms, a, b, metric):
        return f"{a} beats {b}"
    if beats(arms, b, a, metric):
        return f"{b} beats {a}"
    return f"{a} and {b} are within one sd of each other"


def answer(arms: dict) -> str:
    def ce(arm, metric="ce_at_equal_flops"):
        return format_mean_sd(arms[arm][f"{metric}_mean"], arms[arm][f"{metric}_sd"])

    return (
        f"At equal training FLOPs, depth vs thinking time: {verdict(arms, 'ctm_4l_all_k2', 'ctm_2l_all_k4', 'ce_at_equal_flops')} "
        f"({ce('ctm_4l_all_k2')} vs {ce('ctm_2l_all_k4')} nats/token), and the plain 4-layer transformer reaches "
        f"{ce('mlp_4l')} ({verdict(arms, 'mlp_4l', 'ctm_4l_all_k2', 'ce_at_equal_flops')}); last vs all layers: "
        f"{verdict(arms, 'ctm_4l_last_k2', 'ctm_4l_all_k2', 'ce_at_equal_flops')} ({ce('ctm_4l_last_k2')} vs "
        f"{ce('ctm_4l_all_k2')}). At equal tokens: {verdict(arms, 'ctm_4l_all_k2', 'ctm_2l_all_k4', 'final_ce')}; "
        f"{verdict(arms, 'ctm_4l_last_k2', 'ctm_4l_all_k2', 'final_ce')}; "
        f"{verdict(arms, 'mlp_4l', 'ctm_4l_all_k2', 'final_ce')}."
    )


def plot(per_seed: list[dict], budget: float, path: Path) -> None:
    """Held-out CE against cumulative training FLOPs and against training wall time, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in ARMS:
        curves = [record[arm]["curve"] for record in per_seed]
        for ax, key, scale in ((axes[0], "training_flops", 1e12), (axes[1], "train_seconds", 1.0)):
            xs = [statistics.fmean([c[i][key] for c in curves]) / scale for i in range(len(curves[0]))]
            stats = [mean_sd([c[i]["ce"] for c in curves]) for i in range(len(curves[0]))]
            mean = [m for m, _ in stats]
            ax.plot(xs, mean, marker=".", label=arm)
            ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    axes[0].axvline(budget / 1e12, color="grey", linestyle="--", label="equal-FLOPs budget")
    axes[0].set_xlabel("training FLOPs (x 1e12, analytic)")
    axes[1].set_xlabel("training wall time (s, shared CPU)")
    for ax in axes:
        ax.set_ylabel("held-out CE (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"E14: held-out CE vs compute (mean ± sd over {len(per_seed)} seeds)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def format_markdown(result: dict) -> str:
    s = result["settings"]
    arms = result["arms"]
    shape_rows = "\n".join(
        f"| {arm} | {SHAPES[arm][0]} | {SHAPES[arm][1]} | {SHAPES[arm][2]} | {arms[arm]['parameters_mean']:,.0f} "
        f"| {arms[arm]['flops_per_token_training_mean'] / 1e6:.3f} |"
        for arm in ARMS
    )
    table = arms_table(arms, ("final_ce", "ce_at_equal_flops", "ce_at_equal_wall", "repetition_4gram"))
    cost = arms_table(arms, ("train_seconds", "foreign_load"), digits=2)
    return (
        f"# E14: depth vs thinking time at equal FLOPs ({s['seeds']} seeds, {s['steps']} steps per arm)\n\n"
        f"D={s['hidden_size']}, {s['num_attention_heads']} heads, MLP {s['intermediate_size']}, vocab "
        f"{s['vocab_size']}, blocks of {s['block_size']} tokens, batch {s['batch_size']}, constant LR "
        f"{s['learning_rate']} after {s['warmup_steps']} warm-up steps; held-out CE (nats/token, served readout) on "
        f"{s['eval_blocks']} held-out blocks every {s['eval_every']} steps. Machine: {result['machine']}.\n\n"
        f"| arm | layers | ctm_layers | K | parameters | training MFLOP/token |\n|---|---|---|---|---:|---:|\n"
        f"{shape_rows}\n\n{table}\n\n"
        f"Equal FLOPs: at {result['flop_budget']:.3g} training FLOPs (the cheapest arm's end), interpolated on each "
        f"arm's curve. Equal wall: at each seed's shortest arm's training time ({', '.join(f'{w:.0f}' for w in result['wall_budgets'])} s), "
        f"interpolated. repetition_4gram: repeated 4-grams in {s['new_tokens']} greedy tokens from {s['prompts']} "
        f"held-out prompts of {s['prompt_length']} tokens.\n\n"
        f"Training wall time and the fraction of the CPUs other processes used meanwhile (shared machine):\n\n{cost}\n\n"
        f"**Answer.** {result['answer']}\n\n![CE vs FLOPs](ce_vs_flops.png)\n"
    )


def run(settings: Settings, seeds: int, out_dir: Path | None, log=print) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, train_set, blocks, prompts = load_data(settings, Path(tmp))
    per_seed = []
    for seed in range(seeds):
        record = {"seed": seed}
        for arm in ARMS:
            record[arm] = run_arm(arm, seed, settings, tokenizer, train_set, blocks, prompts)
            row = record[arm]
            log(
                f"seed {seed} {arm:<15} final CE {row['final_ce']:.4f} | {row['train_seconds']:.0f} s train "
                f"(foreign load {row['foreign_load']:.2f}) | repetition {row['repetition_4gram']:.3f}"
            )
        per_seed.append(record)
    budget, walls = compare(per_seed)
    arms = summarize_arms(per_seed, ARMS, METRICS)
    result = experiment_result(
        {**asdict(settings), "seeds": seeds, "shapes": SHAPES},
        per_seed,
        arms,
        experiment="iso_flops_e14",
        machine=f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        flop_budget=budget,
        wall_budgets=walls,
        answer=answer(arms),
        total_seconds=time.perf_counter() - started,
    )
    log(result["answer"])
    if out_dir is not None:
        write_results(out_dir, result, format_markdown(result))
        plot(per_seed, budget, Path(out_dir) / "ce_vs_flops.png")
        log(f"wrote {out_dir}/results.json, results.md and ce_vs_flops.png")
    return result


def main(argv=None):
    parser = experiment_parser(__doc__, default_out="eval/results/iso_flops_e14", settings=Settings, quick=QUICK)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 200)")
    args = parser.parse_args(argv)
    settings = args.settings
    return run(settings, args.seeds, args.out)


if __name__ == "__main__":
    main()
