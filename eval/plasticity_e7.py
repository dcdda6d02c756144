"""E7 + E12: does one Hebbian edit store what was read, beyond a same-norm random edit, and what does it cost?

Model. One tiny `CTMForCausalLM` (the last of 2 layers thinks) trained in this script with `CTMTrainer` on the
embedded Austen training novels (a small BPE tokenizer fitted on them), briefly: a "trained tiny checkpoint", shared
by all seeds (seeds vary the passages, the facts and the random controls).

E7, re-exposure. For each passage P (64 tokens of the held-out novel, Persuasion), its held-out continuation P' (the
next 64 tokens) and an unrelated passage U (elsewhere in the novel): P is read once with plasticity on (one teacher-
forced forward), one edit is applied, then - with the context cleared (a fresh forward, nothing carried) - CE on P, P'
and U is measured and compared with the same model before the edit; the edit is undone (`reset_plasticity`) before
the next passage. Arms, all on the same two matrices (the last layer's readout `out_proj` and last synapse layer):

    off       plasticity off (the forward with the observer registered and no edit: must be exactly 0)
    gated     the rule with the surprise gate (per-token CE of the next token)
    ungated   the rule without the gate (every token weighs 1), same learning rate
    random    a random edit with the SAME per-matrix norm as the gated edit actually applied
    sgd       one gradient step on CE(P) for the same two matrices, scaled to the same per-matrix norm (the upper
              bound of what a same-size edit of these matrices can do for P)

Fact task. "The code of NAME is CODE." (invented names, 8 code words, a random one-to-one assignment per seed) is
read once, one edit, then in a new context "The code of NAME is" is scored: recall = the true code has the highest
log-probability among the 8 codes (chance 1/8). Per arm, with the same same-norm controls.

E12 (gating). Per passage, the share of the CE drop on P that falls on the 25% most surprising tokens (highest CE
before the edit), per arm; and the fact-task recall gated vs ungated.

Stability. Plasticity stays on while text is streamed in chunks of 32 tokens with one edit per chunk, never reset:
every edited matrix's norm over its anchor norm per edit (must stay inside 1 +- band), NaN count, and CE on a fixed
set of unrelated text every `stability_eval_every` edits (stated bound: it may rise by at most `ce_u_bound` nats).
A PNG draws the norms and the CE over the edits.

Cost. Time per token of a forward with the plasticity observer on vs off (same batch, median of repeats), the time of
one edit, and the memory held (anchors + statistics) and the transient per-forward buffers.

    python eval/plasticity_e7.py [--seeds 3] [--out eval/results/plasticity_e7] [--quick]
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


torch.set_num_threads(1)

import datasets  # noqa: E402
from datasets import Dataset  # noqa: E402
from harness import (  # noqa: E402
    experiment_parser,
    mean_sd,
    tiny_config,
    train_experiment_model,
    write_results,
)
from plasticity_e7_report import draw_stability, format_markdown  # noqa: E402  (a sibling module)
from transformers import set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMForCausalLM  # noqa: E402
from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig, memory_held_bytes  # noqa: E402
from modeling_ctm.training.data import austen_splits, pack_dataset  # noqa: E402
from modeling_ctm.training.tokenization import train_austen_tokenizer  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


ARMS = {
    "off": "plasticity off (observer on, no edit)",
    "gated": "rule, surprise-gated",
    "ungated": "rule, no surprise gate (same lr)",
    "random": "random edit, same per-matrix norm as gated",
    "sgd": "one SGD step on P, same per-matrix norm (upper bound)",
}
NAMES = ["Velmora", "Quenthis", "Darrowby", "Ilsabeth", "Morwenna", "Tibaldo", "Ysolde", "Castrel"]
CODES = ["garden", "letter", "carriage", "window", "river", "candle", "music", "winter"]


@dataclass
class Settings:
    seeds: int = 3
    # tokenizer and model
    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    ctm_ticks: int = 3
    ctm_memory_length: int = 4
    ctm_n_synch_out: int = 32
    ctm_n_synch_action: int = 16
    ctm_nlm_hidden_size: int = 8
    ctm_synapse_depth: int = 4
    # training
    train_steps: int = 400
    batch_size: int = 16
    block_size: int = 64
    train_learning_rate: float = 3e-3
    # plasticity
    learning_rate: float = 1000.0  # the max_step cap binds: every edit has norm max_step x anchor norm
    synapse_learning_rate: float = 0.05
    band: float = 0.1
    max_drift: float = 0.3
    max_step: float = 0.1
    novelty_quantile: float = 0.5
    presynaptic: str = "raw"
    # E7
    passages: int = 8
    passage_length: int = 64
    # stability
    stability_edits: int = 3_000  # ~2 min here; the 10,000: --set stability_edits=10000
    stability_chunk: int = 32
    stability_eval_every: int = 500
    ce_u_bound: float = 0.5
    # cost
    cost_batch: int = 4
    cost_length: int = 128
    cost_repeats: int = 10

    def plasticity(self, gate: str = "prediction_error") -> PlasticityConfig:
        rule = ("learning_rate", "synapse_learning_rate", "band", "max_drift", "max_step", "novelty_quantile",
                "presynaptic")  # fmt: skip
        return PlasticityConfig(**{name: getattr(self, name) for name in rule}, gate=gate)


QUICK = dict(
    train_steps=10, batch_size=4, passages=1, stability_edits=20, stability_eval_every=10, cost_repeats=2, vocab_size=300
)


# ----------------------------------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def train_model(settings: Settings, tokenizer, blocks: Dataset) -> tuple[CTMForCausalLM, list[dict]]:
    set_seed(0)
    config = tiny_config(
        settings,
        vocab_size=len(tokenizer),
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=256,
        ctm_layers="last",
        ctm_readout="last",
        ctm_loss_tick_aux_weight=0.5,
        ctm_loss_certain_weight=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return train_experiment_model(
        CTMTrainer,
        CTMForCausalLM(config),
        blocks,
        seed=0,
        max_steps=settings.train_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.train_learning_rate,
        warmup_steps=max(1, settings.train_steps // 20),
        lr_scheduler_type="cosine",
        logging_steps=max(1, settings.train_steps // 8),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_ce(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token CE (B, T-1) of a fresh forward (nothing carried in)."""
    logits = model(ids).logits.float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def code_scores(model, tokenizer) -> torch.Tensor:
    """(n_names, n_codes): log P(code | "The code of NAME is"), summed over the code's tokens, for every name and code
    in one batch (rows right-padded, which a causal model cannot see)."""
    rows, spans = [], []
    for name in NAMES:
        prefix = tokenizer(f"The code of {name} is", add_special_tokens=False)["input_ids"]
        for code in CODES:
            code_ids = tokenizer(f" {code}", add_special_tokens=False)["input_ids"]
            rows.append(prefix + code_ids)
            spans.append((len(prefix) - 1, len(prefix) - 1 + len(code_ids)))
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
    ce = token_ce(model, ids)  # (rows, width - 1): position p predicts token p + 1
    positions = torch.arange(width - 1)[None]
    start, end = torch.tensor(spans).T
    mask = (positions >= start[:, None]) & (positions < end[:, None])
    return -(ce * mask).sum(-1).view(len(NAMES), len(CODES))


def target_deltas(rule: HebbianPlasticity) -> dict[str, torch.Tensor]:
    return {name: edit.float() for name, edit in rule.edits().items()}


def set_offsets(rule: HebbianPlasticity, offsets: dict[str, torch.Tensor]) -> None:
    rule.set_edits(offsets)


def same_norm(direction: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, ref in reference.items():
        d = direction[name].float()
        norm = d.norm()
        out[name] = d * (ref.float().norm() / norm) if norm > 0 else torch.zeros_like(ref)
    return out


def sgd_direction(model, rule: HebbianPlasticity, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    params = [t.param for t in rule.targets]
    with torch.enable_grad():
        logits = model(ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, params)
    return {t.name: -g.detach() for t, g in zip(rule.targets, grads)}


def edit_arms(model, rules: dict[str, HebbianPlasticity], read_ids: torch.Tensor, measure, generator) -> dict:
    """Read `read_ids` once and edit with each arm; `measure()` after each edit. Every arm starts from the anchors."""
    gated, ungated = rules["gated"], rules["ungated"]
    results = {}
    with gated:  # off: the observer is registered, nothing is applied
        token_ce(model, read_ids)
        results["off"] = measure()
        gated.reset_statistics()  # only the reading of `read_ids` below feeds the edit
        token_ce(model, read_ids)
        gated.apply()
        applied = target_deltas(gated)
        results["gated"] = measure()
        gated.reset_plasticity()
    with ungated:
        token_ce(model, read_ids)
        ungated.apply()
        results["ungated"] = measure()
        ungated.reset_plasticity()
    noise = {n: torch.randn(d.shape, generator=generator) for n, d in applied.items()}
    set_offsets(gated, same_norm(noise, applied))
    results["random"] = measure()
    gated.reset_plasticity()
    set_offsets(gated, same_norm(sgd_direction(model, gated, read_ids), applied))
    results["sgd"] = measure()
    gated.reset_plasticity()
    results["edit_norm"] = {n: float(d.norm()) for n, d in applied.items()}
    return results


def run_e7(model, tokenizer, settings: Settings, passages: list, seed: int) -> dict:
    generator = torch.Generator().manual_seed(1000 + seed)
    rules = {
        "gated": HebbianPlasticity(model, settings.plasticity("prediction_error")),
        "ungated": HebbianPlasticity(model, settings.plasticity("none")),
    }
    per_passage = []
    for P, P2, U in passages:
        base = {k: token_ce(model, x)[0] for k, x in (("P", P), ("P2", P2), ("U", U))}
        surprising = base["P"] >= torch.quantile(base["P"], 0.75)

        def measure():
            after = {k: token_ce(model, x)[0] for k, x in (("P", P), ("P2", P2), ("U", U))}
            drop_p = base["P"] - after["P"]
            total = float(drop_p.sum())
            return {
                "delta_ce_p": float(after["P"].mean() - base["P"].mean()),
                "delta_ce_p2": float(after["P2"].mean() - base["P2"].mean()),
                "delta_ce_u": float(after["U"].mean() - base["U"].mean()),
                "surprising_share": float(drop_p[surprising].sum()) / total if abs(total) > 1e-9 else math.nan,
            }

        per_passage.append(edit_arms(model, rules, P, measure, generator))
    # facts: a random one-to-one assignment of codes to names
    order = torch.randperm(len(CODES), generator=generator).tolist()
    per_fact = []
    for row, (name, code_index) in enumerate(zip(NAMES, order)):
        statement = torch.tensor([tokenizer(f"The code of {name} is {CODES[code_index]}.")["input_ids"]])

        def measure():
            scores = code_scores(model, tokenizer)
            top = scores.argmax(-1)
            others = [r for r in range(len(NAMES)) if r != row]
            return {
                "recall": float(top[row] == code_index),
                "margin": float(scores[row, code_index] - scores[row].mean()),
                # neighbourhood: how often a name that was never stated now answers the stored code
                "bleed": float((top[others] == code_index).float().mean()),
            }

        per_fact.append(edit_arms(model, rules, statement, measure, generator))

    summary = {}
    for arm in ARMS:
        row = {}
        for metric in ("delta_ce_p", "delta_ce_p2", "delta_ce_u", "surprising_share"):
            values = [p[arm][metric] for p in per_passage if not math.isnan(p[arm][metric])]
            row[metric] = statistics.fmean(values) if values else math.nan
        row["fact_recall"] = statistics.fmean(f[arm]["recall"] for f in per_fact)
        row["fact_margin"] = statistics.fmean(f[arm]["margin"] for f in per_fact)
        row["fact_bleed"] = statistics.fmean(f[arm]["bleed"] for f in per_fact)
        summary[arm] = row
    norms = [p["edit_norm"] for p in per_passage]
    summary["edit_norm"] = {n: statistics.fmean(x[n] for x in norms) for n in norms[0]}
    summary["anchor_norm"] = {n: float(a.norm()) for n, a in rules["gated"].anchors.items()}
    return summary


def run_stability(model, settings: Settings, stream: torch.Tensor, unrelated: torch.Tensor) -> dict:
    """Edits on streamed text, never reset: norm ratios per edit, NaN count, CE on unrelated text over time."""
    rule = HebbianPlasticity(model, settings.plasticity()).enable()
    C = settings.stability_chunk
    n_chunks = stream.numel() // C
    ce_u0 = float(token_ce(model, unrelated).mean())
    norms = {t.name: [] for t in rule.targets}
    ce_curve = [(0, ce_u0)]
    nan_count = 0
    start = time.time()
    for edit in range(1, settings.stability_edits + 1):
        i = (edit - 1) % n_chunks
        token_ce(model, stream[i * C : (i + 1) * C][None])
        report = rule.apply()
        if not report.get("applied"):
            nan_count += int(report.get("skipped", False))
        for name, ratio in rule.norm_ratios().items():
            norms[name].append(ratio)
            if not math.isfinite(ratio):
                nan_count += 1
        if edit % settings.stability_eval_every == 0 or edit == settings.stability_edits:
            ce_curve.append((edit, float(token_ce(model, unrelated).mean())))
    seconds = time.time() - start
    drift = {name: float(edit.norm() / rule.anchors[name].double().norm()) for name, edit in rule.edits().items()}
    rule.reset_plasticity()
    rule.disable()
    ce_values = [c for _, c in ce_curve]
    return {
        "edits": settings.stability_edits,
        "tokens_per_edit": C,
        "edits_applied": rule.edits_applied,
        "edits_skipped": rule.edits_skipped,
        "nan_or_skipped": nan_count,
        "norm_ratio_min": {n: min(v) for n, v in norms.items()},
        "norm_ratio_max": {n: max(v) for n, v in norms.items()},
        "inside_band": all(1 - settings.band - 1e-5 <= r <= 1 + settings.band + 1e-5 for v in norms.values() for r in v),
        "final_drift_over_anchor_norm": drift,
        "ce_u_start": ce_u0,
        "ce_u_max": max(ce_values),
        "ce_u_end": ce_values[-1],
        "ce_u_max_rise": max(ce_values) - ce_u0,
        "ce_u_bound": settings.ce_u_bound,
        "ce_u_within_bound": max(ce_values) - ce_u0 <= settings.ce_u_bound,
        "ce_curve": ce_curve,
        "seconds": round(seconds, 1),
        "_norms": norms,
    }


def run_cost(model, settings: Settings, ids: torch.Tensor) -> dict:
    def timed(fn):
        times = []
        for _ in range(settings.cost_repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    tokens = ids.numel()
    with torch.no_grad():
        model(ids)  # warm-up
        off = timed(lambda: model(ids))
        rule = HebbianPlasticity(model, settings.plasticity())
        with rule:
            on = timed(lambda: model(ids))
            edit = timed(lambda: (model(ids), rule.apply(), rule.reset_plasticity()))
        c = model.config
        block = model.model.layers[-1].thinking
        synapse_in = block.synapse.up[-1].in_features
        transient = ids.numel() * c.ctm_ticks * (c.ctm_n_synch_out + synapse_in + c.hidden_size) * 4
    return {
        "tokens_per_forward": tokens,
        "ms_per_token_off": 1e3 * off / tokens,
        "ms_per_token_on": 1e3 * on / tokens,
        "overhead_on_vs_off": on / off - 1.0,
        "ms_per_edit_including_forward": 1e3 * edit,
        "memory_held_bytes": memory_held_bytes(rule),
        "transient_buffer_bytes_per_forward": transient,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def run(settings: Settings, out_dir: Path, log=print) -> dict:
    start = time.time()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = train_austen_tokenizer(settings.vocab_size)
    splits = austen_splits()
    needed = settings.train_steps * settings.batch_size * settings.block_size * 6  # ~6 characters per token, generous
    texts, size = [], 0
    for text in splits["train"]["text"]:
        texts.append(text)
        size += len(text)
        if size >= needed:
            break
    train_blocks = pack_dataset(Dataset.from_dict({"text": texts}), tokenizer, settings.block_size)
    t0 = time.time()
    model, train_log = train_model(settings, tokenizer, train_blocks)
    train_seconds = time.time() - t0
    log(f"trained {settings.train_steps} steps in {train_seconds:.0f}s; loss {train_log[-1]['loss'] if train_log else '?'}")

    validation = tokenizer("\n\n".join(splits["validation"]["text"]), add_special_tokens=False)["input_ids"]
    validation = torch.tensor(validation)
    L = settings.passage_length
    half = validation.numel() // 2
    unrelated_fixed = validation[half : half + 4 * L].view(4, L)  # stability and cost: text the stream never holds

    per_seed = []
    for seed in range(settings.seeds):
        generator = torch.Generator().manual_seed(seed)
        passages = []
        for _ in range(settings.passages):
            i = int(torch.randint(0, half - 2 * L, (1,), generator=generator))
            j = int(torch.randint(half + 4 * L, validation.numel() - L, (1,), generator=generator))
            passages.append((validation[i : i + L][None], validation[i + L : i + 2 * L][None], validation[j : j + L][None]))
        t = time.time()
        per_seed.append(run_e7(model, tokenizer, settings, passages, seed))
        log(
            f"seed {seed}: "
            + "  ".join(f"{arm} dP {per_seed[-1][arm]['delta_ce_p']:+.4f} rec {per_seed[-1][arm]['fact_recall']:.2f}" for arm in ARMS)
            + f"  ({time.time() - t:.0f}s)"
        )

    arms = {}
    for arm, description in ARMS.items():
        row = {"description": description}
        for metric in ("delta_ce_p", "delta_ce_p2", "delta_ce_u", "surprising_share", "fact_recall", "fact_margin", "fact_bleed"):
            m, s = mean_sd([r[arm][metric] for r in per_seed], skip_nan=True)
            row[f"{metric}_mean"], row[f"{metric}_sd"] = m, s
        arms[arm] = row
    fractions = [r["gated"]["delta_ce_p"] / r["sgd"]["delta_ce_p"] for r in per_seed if r["sgd"]["delta_ce_p"] != 0]
    fraction_of_sgd = mean_sd(fractions, skip_nan=True)
    beyond_random = [r["random"]["delta_ce_p"] - r["gated"]["delta_ce_p"] for r in per_seed]

    stream = torch.tensor(
        tokenizer("\n\n".join(splits["train"]["text"][-2000:]), add_special_tokens=False)["input_ids"]
    )
    stability = run_stability(model, settings, stream, unrelated_fixed)
    log(
        f"stability: {stability['edits']} edits in {stability['seconds']}s, inside band {stability['inside_band']}, "
        f"NaN/skipped {stability['nan_or_skipped']}, CE_U {stability['ce_u_start']:.3f} -> max {stability['ce_u_max']:.3f}"
    )
    cost = run_cost(model, settings, validation[: settings.cost_batch * settings.cost_length].view(settings.cost_batch, -1))

    out_dir.mkdir(parents=True, exist_ok=True)
    draw_stability(stability, out_dir / "stability.png", settings.band)
    norms = stability.pop("_norms")
    result = {
        "experiment": "E7 + E12: Hebbian re-exposure edit vs same-norm random and SGD edits; stability; cost",
        "settings": asdict(settings),
        "plasticity_config": settings.plasticity().to_dict(),
        "train_log": train_log,
        "train_seconds": round(train_seconds, 1),
        "arms": arms,
        "gated_fraction_of_sgd_delta_ce_p": {"mean": fraction_of_sgd[0], "sd": fraction_of_sgd[1]},
        "gated_minus_random_delta_ce_p": dict(zip(("mean", "sd"), mean_sd([-x for x in beyond_random], skip_nan=True))),
        "fact_chance": 1 / len(CODES),
        "per_seed": per_seed,
        "stability": {**stability, "norm_ratio_last": {n: v[-1] for n, v in norms.items()}},
        "cost": cost,
        "wall_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine_note": "shared 2-core CPU, other agents running; single thread",
    }
    write_results(out_dir, result, format_markdown(result))
    log(format_markdown(result))
    return result


def main(argv=None) -> int:
    parser = experiment_parser(__doc__, default_out="eval/results/plasticity_e7", quick_seeds=3, settings=Settings, quick=QUICK)
    args = parser.parse_args(argv)
    run(args.settings, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
