"""E5, the continuity proof: can a value seen in chunk 1 be recalled in chunk 2 when the ONLY path between the two
chunks is the carried CTM thinking state?

Task (synthetic recall). Every sequence is two chunks of L tokens::

    chunk 1:  noise ... STORE v noise ...          (STORE at a random position, v one of `n_values` value tokens)
    chunk 2:  noise ... noise RECALL v

The only loss is on predicting v at the RECALL position (labels are -100 everywhere else: the noise is uniform, so
an LM loss on it would only add irreducible entropy; v after STORE is unpredictable by construction). The trailing
v is an input nobody predicts from (the last position has no target), and causal attention keeps it invisible to
the RECALL position. The model is `ctm_carry="chunk"` with `ctm_chunk_size = L`, so every token of chunk 2 starts its
K ticks from the final thinking state (z, trace, sync accumulators) of the last token of chunk 1. The attention KV
(self-attention and the CTM cross-attention) is dropped at the boundary in training (`cut_attention=True`) and in
every evaluation arm, so chance (1 / n_values) is the ceiling of any model that does not carry information in the
thinking state.

Arms (each over several seeds, a tiny `CTMForCausalLM` trained from scratch with `ContinuityTrainer`):

    A  carry + gradient through the boundary (gradient_window=1); evaluated with the carried state
    B  the SAME models as A, evaluated with the state reset at the boundary (chunk 2 from a fresh `CTMCache`, i.e.
       from the learned start state) - must be at chance: chunk 2 then sees nothing of chunk 1
    C  carry detached at every boundary (gradient_window=0, the reference's behaviour); evaluated with the carried
       state - nothing teaches chunk 1 what to store, so only incidental information can cross

Choices. One decoder layer that thinks (hidden 32, K=3 ticks, trace M=4, synapse depth 2), decays 0 (r = 1: plain
running sums), `ctm_readout="last"` (the evaluation reads the final tick), trained on 0.5 x CE at the lowest-loss
tick + 0.5 x mean CE over the ticks (the mean keeps the final tick, the one read, trained). The training `loss` in
the logs therefore includes the optimistic lowest-loss-tick term and can sit below ln(n_values) without any
information; `final_tick` in results.json is the CE of the tick that is read. Every training sequence is fresh
(steps x batch sequences, one epoch); the evaluation uses 512 other sequences.

Besides the arms, every seed records two mechanics checks on the W=1 model: `path_checks` (the carried chunk 2 equals
chunk 2 started from nothing but `thinking_state_dict()`; the reset chunk 2 equals chunk 2 run alone) and
`gradient_reach` (|dL/d chunk-1 embeddings| is > 0 with W=1 and exactly 0 with the detach; the share of the
parameter gradient that crossed the boundary, from `ContinuityTrainer.chunked_forward` itself).

    python eval/continuity_e5.py [--seeds 3] [--steps N] [--out eval/results/e5] [--quick] [--set FIELD=VALUE ...]

Writes results.json and results.md to --out and prints the table.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


# Tiny tensors gain nothing from intra-op threads; on a busy 2-core box two threads make this ~50x slower.
torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402
from harness import (  # noqa: E402
    experiment_parser,
    experiment_result,
    experiment_training_arguments,
    finish_experiment,
    format_mean_sd,
    run_seeds,
    summarize_arms,
    tiny_config,
)
from transformers import PrinterCallback, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMConfig, CTMForCausalLM  # noqa: E402
from modeling_ctm.cache_ctm import CTMCache  # noqa: E402
from modeling_ctm.training.trainers import ContinuityTrainer  # noqa: E402


PAD, STORE, RECALL, FIRST_VALUE = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------------


# The model: CTMConfig fields, validated by CTMConfig itself (`make_config`); the task adds the vocabulary, the chunk
# carry (`ctm_carry="chunk"`, `ctm_chunk_size` = chunk_length), the positions and the pad token.
MODEL = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    ctm_layers="all",
    ctm_ticks=3,
    ctm_memory_length=4,
    ctm_n_synch_out=32,
    ctm_n_synch_action=16,
    ctm_nlm_hidden_size=8,
    ctm_synapse_depth=2,
    ctm_decay_init_range=[0.0, 0.0],
    ctm_readout="last",
    ctm_loss_argmin_weight=0.5,
    ctm_loss_certain_weight=0.0,
    ctm_loss_tick_aux_weight=0.5,
)
TASK_FIELDS = ("vocab_size", "max_position_embeddings", "pad_token_id", "ctm_carry", "ctm_chunk_size")


@dataclass
class Settings:
    # task
    chunk_length: int = 8
    n_values: int = 8
    vocab_size: int = 32
    distractors: bool = False  # noise may contain value tokens too (then only "the token after STORE" is v)
    # model: CTMConfig fields (see MODEL); `--set FIELD=VALUE` overrides one
    model: dict = field(default_factory=lambda: copy.deepcopy(MODEL))
    # training
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # evaluation
    eval_sequences: int = 512
    seeds: int = 3

    @property
    def noise_tokens(self) -> list[int]:
        if self.distractors:
            return list(range(FIRST_VALUE, self.vocab_size))
        return list(range(FIRST_VALUE + self.n_values, self.vocab_size))

    def validate(self):
        if self.vocab_size - FIRST_VALUE - self.n_values < 2:
            raise ValueError(
                f"vocab_size={self.vocab_size} is invalid: needs room for 3 specials, the values and noise"
            )
        if self.chunk_length < 3:
            raise ValueError(f"chunk_length={self.chunk_length} is invalid: allowed values are integers >= 3")
        config_fields = CTMConfig().to_dict()
        for name in self.model:
            if name in TASK_FIELDS or name not in config_fields:
                raise ValueError(
                    f"model field {name!r} is invalid: allowed fields are the CTMConfig fields except the task's "
                    f"{list(TASK_FIELDS)}"
                )
        make_config(self)  # CTMConfig validates the values


QUICK = dict(steps=4, batch_size=16, eval_sequences=64, seeds=1, warmup_steps=0)


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


def make_sequences(settings: Settings, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n sequences of 2 chunks of L tokens; returns input_ids, attention_mask, labels (B, 2L) and values (B,)."""
    L = settings.chunk_length
    noise = torch.tensor(settings.noise_tokens)
    ids = noise[torch.randint(len(noise), (n, 2 * L), generator=generator)]
    values = FIRST_VALUE + torch.randint(settings.n_values, (n,), generator=generator)
    store_at = torch.randint(L - 1, (n,), generator=generator)  # STORE at p in [0, L-2], v at p + 1 (inside chunk 1)
    rows = torch.arange(n)
    ids[rows, store_at] = STORE
    ids[rows, store_at + 1] = values
    ids[:, 2 * L - 2] = RECALL
    ids[:, 2 * L - 1] = values
    labels = torch.full_like(ids, -100)
    labels[:, 2 * L - 1] = values  # shifted inside the model: the target of the RECALL position
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "values": values}


def make_dataset(settings: Settings, n: int, seed: int) -> Dataset:
    data = make_sequences(settings, n, torch.Generator().manual_seed(seed))
    return Dataset.from_dict({k: data[k].tolist() for k in ("input_ids", "attention_mask", "labels")})


# ----------------------------------------------------------------------------------------------------------------------
# Model, training
# ----------------------------------------------------------------------------------------------------------------------


def make_config(settings: Settings) -> CTMConfig:
    L = settings.chunk_length
    return tiny_config(settings, max_position_embeddings=4 * L, pad_token_id=PAD, ctm_carry="chunk", ctm_chunk_size=L)


def make_trainer(settings: Settings, seed: int, gradient_window: int, output_dir: str, train_dataset=None):
    set_seed(seed)
    model = CTMForCausalLM(make_config(settings))
    if train_dataset is None:
        train_dataset = make_dataset(settings, settings.steps * settings.batch_size, seed=10_000 + seed)
    args = experiment_training_arguments(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=max(1, settings.steps // 10),
    )
    trainer = ContinuityTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        chunk_length=settings.chunk_length,
        gradient_window=gradient_window,
        cut_attention=True,
    )
    trainer.remove_callback(PrinterCallback)  # the losses are kept in state.log_history and summarised
    return trainer


def train(settings: Settings, seed: int, gradient_window: int) -> tuple[CTMForCausalLM, list[dict]]:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(settings, seed, gradient_window, output_dir)
        trainer.train()
    # `loss` is the training objective (it includes the optimistic lowest-loss-tick term, so it can sit below chance
    # without any information); `final_tick` is the CE of the tick the evaluation reads with ctm_readout="last".
    losses = [
        {
            "step": log["step"],
            "loss": round(log["loss"], 4),
            "final_tick": round(log.get("ctm/loss_final_tick", math.nan), 4),
        }
        for log in trainer.state.log_history
        if "loss" in log
    ]
    return trainer.model.eval(), losses


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def chunk2_logits(model: CTMForCausalLM, input_ids: torch.Tensor, carry: bool) -> torch.Tensor:
    """Logits of chunk 2 (B, L, V) with the attention cut at the boundary. `carry`: chunk 2 continues the cache of
    chunk 1 (its thinking state only, after `drop_attention_`); else chunk 2 runs from a fresh `CTMCache`, i.e. from
    the learned start state."""
    L = model.config.ctm_chunk_size
    first, second = input_ids[:, :L], input_ids[:, L : 2 * L]
    if carry:
        cache = model(input_ids=first, cache=CTMCache(model.config), use_cache=True).cache
        cache.drop_attention_()
    else:
        cache = CTMCache(model.config)
    return model(input_ids=second, cache=cache, use_cache=True).logits


@torch.no_grad()
def recall_accuracy(model: CTMForCausalLM, batch: dict[str, torch.Tensor], carry: bool) -> dict[str, float]:
    logits = chunk2_logits(model, batch["input_ids"], carry)[:, -2]  # the RECALL position
    values = batch["values"]
    log_probs = torch.log_softmax(logits.float(), -1)
    return {
        "accuracy": float((logits.argmax(-1) == values).float().mean()),
        "recall_nll": float(-log_probs.gather(1, values[:, None]).mean()),
    }


@torch.no_grad()
def path_checks(model: CTMForCausalLM, input_ids: torch.Tensor) -> dict[str, float]:
    """Mechanics behind the arms, as max |logit differences| over chunk 2 (0 up to float error when they hold):

    * `carry_vs_snapshot`: chunk 2 after chunk 1 + `drop_attention_()` equals chunk 2 started from nothing but the
      saved thinking state (`CTMCache.from_thinking_state(thinking_state_dict())`) - the carry path is the state only;
    * `reset_vs_chunk2_alone`: the reset arm's chunk 2 equals chunk 2 run alone without any cache;
    * `carry_vs_reset`: how much the carried state changes chunk 2 (> 0 once the CTM readout is non-zero)."""
    L = model.config.ctm_chunk_size
    first, second = input_ids[:, :L], input_ids[:, L : 2 * L]
    cache = model(input_ids=first, cache=CTMCache(model.config), use_cache=True).cache
    cache.drop_attention_()
    kv_left = sum(
        layer.keys.numel() if layer.is_initialized and layer.keys is not None else 0 for layer in cache.layers
    )
    kv_left += sum(layer.observed_keys.numel() if layer.observed_keys is not None else 0 for layer in cache.layers)
    snapshot = CTMCache.from_thinking_state(model.config, cache.thinking_state_dict())
    carried = chunk2_logits(model, input_ids, carry=True)
    reset = chunk2_logits(model, input_ids, carry=False)
    from_snapshot = model(input_ids=second, cache=snapshot, use_cache=True).logits
    alone = model(input_ids=second, use_cache=False).logits
    return {
        "attention_entries_left_after_drop": float(kv_left),
        "carry_vs_snapshot": float((carried - from_snapshot).abs().max()),
        "reset_vs_chunk2_alone": float((reset - alone).abs().max()),
        "carry_vs_reset": float((carried - reset).abs().max()),
    }


def gradient_reach(settings: Settings, model: CTMForCausalLM, seed: int) -> dict[str, float]:
    """Do gradients of chunk 2's loss reach chunk 1? On one fresh batch, with the trained model:

    * `chunk1_input_grad_norm_w{0,1}`: |dL/d(embeddings of chunk 1)| with the cache detached at the boundary (W=0)
      or not (W=1) - 0 exactly when detached;
    * `param_grad_rel_diff`: |g(W=1) - g(W=0)| / |g(W=1)| over all parameters, both computed by
      `ContinuityTrainer.chunked_forward(backward=True)` itself - the share of the gradient that came through the
      boundary."""
    batch = make_sequences(settings, settings.batch_size, torch.Generator().manual_seed(20_000 + seed))
    L = settings.chunk_length
    model.train()
    out = {}
    for window in (0, 1):
        model.zero_grad(set_to_none=True)
        embeds = model.get_input_embeddings()(batch["input_ids"][:, :L]).detach().requires_grad_(True)
        cache = model(inputs_embeds=embeds, cache=CTMCache(model.config), use_cache=True).cache
        cache.drop_attention_()
        if window == 0:
            cache.detach_()
        loss = model(
            input_ids=batch["input_ids"][:, L:], labels=batch["labels"][:, L:], cache=cache, use_cache=True
        ).loss
        loss.backward()
        out[f"chunk1_input_grad_norm_w{window}"] = 0.0 if embeds.grad is None else float(embeds.grad.norm())
    grads = {}
    with tempfile.TemporaryDirectory() as output_dir:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        for window in (0, 1):
            trainer = make_trainer(settings, seed, window, output_dir, train_dataset=[])
            trainer.model = model
            model.zero_grad(set_to_none=True)
            trainer.chunked_forward(model, inputs, backward=True)
            grads[window] = torch.cat(
                [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()]
            )
    model.zero_grad(set_to_none=True)
    model.eval()
    out["param_grad_norm_w1"] = float(grads[1].norm())
    out["param_grad_rel_diff"] = float((grads[1] - grads[0]).norm() / grads[1].norm().clamp(min=1e-30))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


ARMS = {
    "A": "carry + gradient through boundary (W=1), eval carried",
    "B": "same models as A, eval with state reset at boundary",
    "C": "carry detached at boundary (W=0), eval carried",
}


def run_seed(settings: Settings, seed: int, eval_batch: dict, log=print) -> dict:
    """Train the W=1 and W=0 models of one seed and evaluate every arm and the mechanics checks."""
    t0 = time.time()
    model_w1, losses_w1 = train(settings, seed, gradient_window=1)
    t1 = time.time()
    model_w0, losses_w0 = train(settings, seed, gradient_window=0)
    t2 = time.time()
    record = {
        "A": recall_accuracy(model_w1, eval_batch, carry=True),
        "B": recall_accuracy(model_w1, eval_batch, carry=False),
        "C": recall_accuracy(model_w0, eval_batch, carry=True),
        "C_reset": recall_accuracy(model_w0, eval_batch, carry=False),
        "path_checks_w1_model": path_checks(model_w1, eval_batch["input_ids"][:64]),
        "gradient_reach_w1_model": gradient_reach(settings, model_w1, seed),
        "train_loss_w1": losses_w1,
        "train_loss_w0": losses_w0,
        "train_seconds_w1": round(t1 - t0, 1),
        "train_seconds_w0": round(t2 - t1, 1),
    }
    last_w1 = losses_w1[-1] if losses_w1 else {"final_tick": math.nan}
    last_w0 = losses_w0[-1] if losses_w0 else {"final_tick": math.nan}
    log(
        f"seed {seed}: A {record['A']['accuracy']:.3f}  B {record['B']['accuracy']:.3f}  "
        f"C {record['C']['accuracy']:.3f}  (train {t1 - t0:.0f}s + {t2 - t1:.0f}s; last logged final-tick "
        f"train CE W=1 {last_w1['final_tick']:.3f}, W=0 {last_w0['final_tick']:.3f}; chance {math.log(settings.n_values):.3f})"
    )
    return record


def run(settings: Settings, out_dir: Path | None, log=print) -> dict:
    settings.validate()
    start = time.time()
    eval_batch = make_sequences(settings, settings.eval_sequences, torch.Generator().manual_seed(99_991))
    per_seed = run_seeds(settings.seeds, lambda seed: run_seed(settings, seed, eval_batch, log))
    result = experiment_result(
        settings,
        per_seed,
        summarize_arms(per_seed, ARMS, metrics=("accuracy", "recall_nll")),
        experiment="E5 continuity: recall across a chunk boundary through the carried CTM thinking state only",
        chance=1.0 / settings.n_values,
        chance_nll=math.log(settings.n_values),
        wall_seconds=round(time.time() - start, 1),
    )
    table = format_table(result)
    finish_experiment(out_dir, result, format_markdown(result, table), log, shown=table)
    return result


def format_table(result: dict) -> str:
    n = len(result["per_seed"])
    lines = [
        f"{'arm':<4} {'description':<55} {'recall accuracy (' + str(n) + ' seeds)':>30} {'chance':>7}",
        "-" * 99,
    ]
    for arm, row in result["arms"].items():
        cell = format_mean_sd(row["accuracy_mean"], row["accuracy_sd"])
        lines.append(f"{arm:<4} {row['description']:<55} {cell:>30} {result['chance']:>7.3f}")
    return "\n".join(lines)


def format_markdown(result: dict, table: str) -> str:
    s = result["settings"]
    rows = "\n".join(
        f"| {arm} | {row['description']} | {format_mean_sd(row['accuracy_mean'], row['accuracy_sd'])} | "
        f"{', '.join(f'{a:.3f}' for a in row['accuracy_per_seed'])} | {row['recall_nll_mean']:.3f} | {result['chance']:.3f} |"
        for arm, row in result["arms"].items()
    )
    reach = "\n".join(
        f"| {r['seed']} | {r['gradient_reach_w1_model']['chunk1_input_grad_norm_w1']:.3g} | "
        f"{r['gradient_reach_w1_model']['chunk1_input_grad_norm_w0']:.3g} | "
        f"{r['gradient_reach_w1_model']['param_grad_rel_diff']:.3g} |"
        for r in result["per_seed"]
    )
    return f"""# E5 continuity: recall through the carried thinking state

Two chunks of {s["chunk_length"]} tokens; chunk 1 holds STORE v, chunk 2 ends with RECALL; the target at RECALL is v
(one of {s["n_values"]} values, chance {result["chance"]:.3f}, chance NLL {result["chance_nll"]:.3f}). Attention is cut at
the boundary in training and in every arm: only the carried CTM thinking state crosses.
{len(result["per_seed"])} seeds, {s["steps"]} steps of batch {s["batch_size"]}, {s["eval_sequences"]} held-out sequences.
Wall time {result["wall_seconds"]:.0f} s.

| arm | description | accuracy mean ± sd | per seed | recall NLL | chance |
|---|---|---|---|---|---|
{rows}

Gradient reach on one batch with the W=1 model (|dL2/d chunk-1 embeddings| with and without the detach; share of the
parameter gradient that crossed the boundary):

| seed | W=1 | W=0 | rel. param-grad difference |
|---|---|---|---|
{reach}

```
{table}
```

Settings: `{json.dumps(s)}`
"""


def parse_args(argv=None):
    parser = experiment_parser(__doc__, default_out="eval/results/e5", settings=Settings, quick=QUICK)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 1200)")
    return parser.parse_args(argv)  # --set takes a Settings field or a CTMConfig field of the model, e.g. ctm_ticks=2



def main(argv=None):
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    run(args.settings, args.out)


if __name__ == "__main__":
    sys.exit(main())
