"""Introspection: is the CTM's certainty a real self-report, and can it decide how long a token thinks?

Per seed, a small model is trained on the embedded Austen novels in two phases (phase 1: a plain transformer; phase 2:
`phases.start_thinking` replaces the MLPs of `--ctm-layers` with CTM blocks, everything else frozen), unless
`--checkpoint` gives a phase-2 folder (and `--baseline` its phase-1 folder). On held-out text (Persuasion):

1. Calibration. Reliability diagram and ECE (10 equal-width bins) of three confidences as predictors of top-1
   correctness of the readout: the CTM's readout certainty (1 - normalised entropy of the selected tick), the CTM's
   softmax max-probability, and the max-probability of the same-shape phase-1 model (the control).
2. Does synchronisation know something the logits do not? AUROC for "this token is wrong" from single scores
   (max-probability, certainty, sync convergence) and from a logistic regression on the logit features
   (max-probability, certainty) with and without the sync features (per thinking layer: convergence
   1 - ||S_K-1 - S_K-2|| / ||S_K-1|| and the mean sync change over ticks), cross-fitted on two halves of the tokens.
3. Adaptive ticks. `ctm_halt_threshold` swept over quantiles of the tokens' sync convergence: readout CE against
   `tick_flops_saved` (the share of real-token x layer x tick evaluations that halted tokens skipped; tick 0 always
   runs, so at most (K-1)/K), next to the fixed K' < K curve (every token thinks K' ticks: the seed's "lobotomy").
   The cost line: cached greedy decoding time per token with halting on vs off (a halted token skips its remaining
   ticks only when every token of the step has halted, i.e. batch-1 decoding; in a full forward halted tokens are
   masked, so the saving there is counted, not timed).
4. fMRI gallery (first seed): `fmri.draw_thinking_map` for the easiest and hardest held-out tokens (lowest / highest
   readout CE), one by one and as groups.

    python eval/introspection.py [--seeds 3] [--out eval/results/introspection] [--quick]

Writes results.json (settings, per-seed numbers, `arms`, `ece`, `auroc`, `halting_curve`, `fixed_ticks_curve`),
results.md and PNGs to --out.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: extra threads only spin

import numpy  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import (  # noqa: E402
    experiment_parser,
    experiment_training_arguments,
    format_stat,
    stat,
    write_results,
)
from introspection_pictures import draw_curves, draw_gallery, draw_reliability  # noqa: E402  (a sibling module)
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from transformers import set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMForCausalLM, CTMTickObserver  # noqa: E402
from modeling_ctm.fmri import sync_change  # noqa: E402
from modeling_ctm.training.data import austen_splits, austen_training_texts, pack_dataset  # noqa: E402
from modeling_ctm.training.phases import freeze_for_thinking, language_config, start_thinking  # noqa: E402
from modeling_ctm.training.tokenization import load_tokenizer, train_tokenizer  # noqa: E402
from modeling_ctm.training.trainers import CTMTrainer  # noqa: E402


@dataclass
class Settings:
    seeds: int = 3
    vocab_size: int = 1024
    tokenizer_paragraphs: int | None = None  # None: every training paragraph
    train_paragraphs: int | None = None
    block_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    ctm_layers: str = "last"  # one MLP replaced: a short phase 2 recovers the phase-1 quality
    ctm_ticks: int = 3
    ctm_memory_length: int = 8
    ctm_n_synch_out: int = 32
    ctm_n_synch_action: int = 16
    ctm_nlm_hidden_size: int = 8
    ctm_synapse_depth: int = 4
    ctm_attention_heads: int = 2
    ctm_loss_tick_aux_weight: float = 0.1
    batch_size: int = 16
    phase1_steps: int = 500
    phase1_lr: float = 3e-3
    phase2_steps: int = 300
    phase2_lr: float = 2e-3
    eval_blocks: int = 64
    bins: int = 10
    threshold_quantiles: tuple = (0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
    gallery_tokens: int = 3
    decode_tokens: int = 24


QUICK = dict(
    seeds=1, vocab_size=300, tokenizer_paragraphs=300, train_paragraphs=300, block_size=32, phase1_steps=4,
    phase2_steps=4, eval_blocks=4, threshold_quantiles=(0.9, 0.5, 0.0), gallery_tokens=1, decode_tokens=4,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Data and training
# ----------------------------------------------------------------------------------------------------------------------


def prepare_data(settings: Settings):
    texts = austen_training_texts()
    if settings.tokenizer_paragraphs:
        texts = texts[: settings.tokenizer_paragraphs]
    tokenizer = train_tokenizer(texts, vocab_size=settings.vocab_size)
    splits = austen_splits()
    train = splits["train"]
    if settings.train_paragraphs:
        train = train.select(range(settings.train_paragraphs))
    packed_train = pack_dataset(train, tokenizer, settings.block_size)
    packed_eval = pack_dataset(splits["validation"], tokenizer, settings.block_size)
    n_eval = min(settings.eval_blocks, len(packed_eval))
    eval_ids = torch.tensor(packed_eval.select(range(n_eval))["input_ids"])
    return tokenizer, packed_train, eval_ids


def train(model, dataset, steps: int, lr: float, settings: Settings, seed: int, tokenizer):
    with tempfile.TemporaryDirectory() as folder:
        args = experiment_training_arguments(
            folder, max_steps=steps, learning_rate=lr, per_device_train_batch_size=settings.batch_size,
            lr_scheduler_type="cosine", warmup_steps=max(1, steps // 15), weight_decay=0.01,
            logging_steps=max(steps, 1), seed=seed,
        )  # fmt: skip
        trainer = CTMTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
    return model.eval()


def build_models(settings: Settings, seed: int, tokenizer, packed_train):
    set_seed(seed)
    config = language_config(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers, num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads, max_position_embeddings=4 * settings.block_size,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    started = time.perf_counter()
    language = train(CTMForCausalLM(config), packed_train, settings.phase1_steps, settings.phase1_lr, settings, seed,
                     tokenizer)  # fmt: skip
    ctm_fields = {k: v for k, v in asdict(settings).items() if k.startswith("ctm_") and k != "ctm_layers"}
    thinking = start_thinking(language, ctm_layers=settings.ctm_layers, **ctm_fields)
    freeze_for_thinking(thinking)
    thinking = train(thinking, packed_train, settings.phase2_steps, settings.phase2_lr, settings, seed, tokenizer)
    return language, thinking, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------------------------
# Scoring held-out tokens
# ----------------------------------------------------------------------------------------------------------------------


def batches(ids: torch.Tensor, size: int):
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def readout_ce(model, ids: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token CE (nats) of the readout logits over the held-out blocks."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in batches(ids, batch_size):
            logits = model(block).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten(), reduction="sum"))
            count += block[:, 1:].numel()
    return total / count


@torch.no_grad()
def score_tokens(model, ids: torch.Tensor, batch_size: int = 16) -> dict[str, numpy.ndarray]:
    """Per held-out token (positions 0..T-2 of every block, predicting the next token): correct, ce, maxprob and,
    for a thinking model, the readout certainty and the sync features of every thinking layer."""
    rows: dict[str, list] = {}

    def add(name, tensor):
        rows.setdefault(name, []).append(tensor[:, :-1].reshape(tensor.shape[0] * (tensor.shape[1] - 1), -1).float())

    for block in batches(ids, batch_size):
        if model.config.ctm_layer_indices:
            outputs, layers = model.probe(block)
        else:
            outputs, layers = model(block), {}
        log_probs = F.log_softmax(outputs.logits.float(), dim=-1)
        targets = F.pad(block[:, 1:], (0, 1))
        add("correct", (log_probs.argmax(-1) == targets).float())
        add("ce", -log_probs.gather(-1, targets[..., None])[..., 0])
        add("maxprob", log_probs.max(-1).values.exp())
        if outputs.certainty is not None:
            add("certainty", outputs.certainty.gather(-1, outputs.selected_tick[..., None])[..., 0])
        for idx in sorted(layers):
            sync = layers[idx].sync_out.float()
            final, previous = sync[:, :, -1], sync[:, :, -2] if sync.shape[2] > 1 else layers[idx].entry_sync_out
            add(f"sync_convergence_{idx}", 1 - (final - previous).norm(dim=-1) / final.norm(dim=-1).clamp_min(1e-12))
            add(f"sync_change_{idx}", sync_change(layers[idx]).mean(-1))
    return {name: torch.cat(parts).squeeze(-1).numpy() for name, parts in rows.items()}


def expected_calibration_error(confidence, correct, bins: int) -> tuple[float, list[dict]]:
    """ECE with equal-width bins on [0, 1]: sum over bins of (share of tokens) x |accuracy - mean confidence|."""
    edges = numpy.linspace(0, 1, bins + 1)
    which = numpy.clip(numpy.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = which == b
        if inside.any():
            accuracy, mean_conf = float(correct[inside].mean()), float(confidence[inside].mean())
            ece += inside.mean() * abs(accuracy - mean_conf)
            table.append({"bin": b, "count": int(inside.sum()), "confidence": mean_conf, "accuracy": accuracy})
    return float(ece), table


def error_auroc(tokens: dict, language_tokens: dict, seed: int) -> dict[str, float]:
    """AUROC for "the readout's top-1 is wrong" from single scores and from logistic regressions (cross-fitted on
    two halves of the tokens) on the logit features alone and with the sync features added."""
    wrong = 1 - tokens["correct"]
    sync_names = sorted(k for k in tokens if k.startswith("sync_"))
    result = {
        "ctm_maxprob": roc_auc_score(wrong, -tokens["maxprob"]),
        "ctm_certainty": roc_auc_score(wrong, -tokens["certainty"]),
        "phase1_maxprob": roc_auc_score(1 - language_tokens["correct"], -language_tokens["maxprob"]),
    }
    for name in sync_names:
        if name.startswith("sync_convergence_"):
            result[name] = roc_auc_score(wrong, -tokens[name])
    logit_features = numpy.stack([tokens["maxprob"], tokens["certainty"]], 1)
    all_features = numpy.concatenate([logit_features, numpy.stack([tokens[n] for n in sync_names], 1)], 1)
    halves = numpy.random.default_rng(seed).permutation(len(wrong)) % 2 == 0
    for name, features in (("logits_only_lr", logit_features), ("logits_plus_sync_lr", all_features)):
        mean, sd = features.mean(0), features.std(0) + 1e-9
        features = (features - mean) / sd
        scores = numpy.zeros(len(wrong))
        for fit in (halves, ~halves):
            model = LogisticRegression(max_iter=1000).fit(features[fit], wrong[fit])
            scores[~fit] = model.decision_function(features[~fit])
        result[name] = roc_auc_score(wrong, scores)
    result["sync_gain"] = result["logits_plus_sync_lr"] - result["logits_only_lr"]
    return {k: float(v) for k, v in result.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Adaptive ticks and the fixed K' curve
# ----------------------------------------------------------------------------------------------------------------------


class HaltCounter(CTMTickObserver):
    """Counts tick evaluations of real tokens that ran and that halted tokens skipped."""

    def __init__(self):
        self.ran = self.skipped = 0

    def on_tick(self, event):
        halted = event.halted if event.halted is not None else torch.zeros_like(event.valid)
        self.ran += int((event.valid & ~halted).sum())
        self.skipped += int((event.valid & halted).sum())


def set_halt_threshold(model, threshold: float | None) -> None:
    model.config.ctm_halt_threshold = threshold
    for layer in model.model.layers:
        if layer.is_thinking:
            layer.thinking.halt_threshold = threshold


def set_ticks(model, ticks: int) -> None:
    model.config.ctm_ticks = ticks
    for layer in model.model.layers:
        if layer.is_thinking:
            layer.thinking.ticks = ticks


@torch.no_grad()
def convergence_quantiles(model, ids, quantiles) -> list[float]:
    """Quantiles of the sync convergence a halting check sees (after every tick but the last, every layer)."""
    values = []
    for block in batches(ids, 16):
        _, layers = model.probe(block)
        for probe in layers.values():
            sync = probe.sync_out.float()
            previous = torch.cat([probe.entry_sync_out.float()[:, :, None], sync[:, :, :-2]], dim=2)
            current = sync[:, :, :-1]
            values.append((1 - (current - previous).norm(dim=-1) / current.norm(dim=-1)).clamp(0, 1).flatten())
    values = torch.cat(values)
    return [float(torch.quantile(values, q)) for q in quantiles]


def halting_curve(model, ids, settings: Settings) -> tuple[list[dict], list[dict], dict]:
    base = readout_ce(model, ids)
    points = []
    thresholds = convergence_quantiles(model, ids, settings.threshold_quantiles)
    for quantile, threshold in zip(settings.threshold_quantiles, thresholds):
        set_halt_threshold(model, threshold)
        with model.observing(HaltCounter()) as counter:
            ce = readout_ce(model, ids)
        saved = counter.skipped / max(1, counter.ran + counter.skipped)
        points.append({"quantile": quantile, "threshold": threshold, "tick_flops_saved": saved, "ce": ce,
                       "delta_ce": ce - base})  # fmt: skip
    set_halt_threshold(model, None)
    K = settings.ctm_ticks
    fixed = []
    for ticks in range(1, K):
        set_ticks(model, ticks)
        ce = readout_ce(model, ids)
        fixed.append({"ticks": ticks, "tick_flops_saved": 1 - ticks / K, "ce": ce, "delta_ce": ce - base})
    set_ticks(model, K)

    # the cost line: batch-1 cached greedy decoding, halting off vs at the median threshold
    prompt = ids[:1, : settings.block_size // 2]
    timing = {}
    median = thresholds[settings.threshold_quantiles.index(0.5)] if 0.5 in settings.threshold_quantiles else None
    for name, threshold in (("off", None), ("median_threshold", median)):
        set_halt_threshold(model, threshold)
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=settings.decode_tokens, min_new_tokens=settings.decode_tokens,
                       do_sample=False)  # fmt: skip
        timing[f"decode_ms_per_token_{name}"] = 1000 * (time.perf_counter() - started) / settings.decode_tokens
    set_halt_threshold(model, None)
    return points, fixed, {"ce_full_K": base, **timing}


# ----------------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------------


def best_within(points: list[dict], budget: float = 0.02) -> float:
    ok = [p["tick_flops_saved"] for p in points if p["delta_ce"] <= budget]
    return max(ok) if ok else 0.0


def run_seed(settings: Settings, seed: int, data, out: Path, checkpoint=None, baseline=None) -> dict:
    tokenizer, packed_train, eval_ids = data
    if checkpoint is not None:
        thinking = CTMForCausalLM.from_pretrained(checkpoint).eval()
        language = CTMForCausalLM.from_pretrained(baseline).eval() if baseline else None
        train_seconds = 0.0
    else:
        language, thinking, train_seconds = build_models(settings, seed, tokenizer, packed_train)
    started = time.perf_counter()
    tokens = score_tokens(thinking, eval_ids)
    language_tokens = score_tokens(language, eval_ids) if language is not None else None
    result = {"seed": seed, "train_seconds": train_seconds, "held_out_tokens": int(len(tokens["correct"]))}
    result["accuracy"] = float(tokens["correct"].mean())
    result["ce"] = float(tokens["ce"].mean())
    tables = {
        "ctm_certainty": expected_calibration_error(tokens["certainty"], tokens["correct"], settings.bins),
        "ctm_maxprob": expected_calibration_error(tokens["maxprob"], tokens["correct"], settings.bins),
    }
    if language_tokens is not None:
        tables["phase1_maxprob"] = expected_calibration_error(
            language_tokens["maxprob"], language_tokens["correct"], settings.bins
        )
        result["phase1_accuracy"] = float(language_tokens["correct"].mean())
        result["phase1_ce"] = float(language_tokens["ce"].mean())
        result["auroc"] = error_auroc(tokens, language_tokens, seed)
    result["ece"] = {name: ece for name, (ece, _) in tables.items()}
    result["reliability"] = {name: table for name, (_, table) in tables.items()}
    result["halting_curve"], result["fixed_ticks_curve"], result["cost"] = halting_curve(thinking, eval_ids, settings)
    result["best_saved_within_0.02_nats"] = {
        "halting": best_within(result["halting_curve"]),
        "fixed_ticks": best_within(result["fixed_ticks_curve"]),
    }
    if seed == 0 or checkpoint is not None:
        result["pictures"] = [
            str(draw_reliability(tables, out / "reliability.png")),
            str(draw_curves(result["halting_curve"], result["fixed_ticks_curve"], out / "halting_curve.png")),
            *draw_gallery(thinking, eval_ids, tokenizer, settings, out),
        ]
    result["eval_seconds"] = time.perf_counter() - started
    return result


def summarise(per_seed: list[dict]) -> dict:
    arms = {}
    for name in per_seed[0]["ece"]:
        arms[name] = {"ece": stat([r["ece"][name] for r in per_seed])}
    if "auroc" in per_seed[0]:
        for name in per_seed[0]["auroc"]:
            arms.setdefault(name, {})["auroc_wrong"] = stat([r["auroc"][name] for r in per_seed])
    arms["ctm_readout"] = {
        "accuracy": stat([r["accuracy"] for r in per_seed]),
        "ce": stat([r["ce"] for r in per_seed]),
    }
    if "phase1_ce" in per_seed[0]:
        arms["phase1_readout"] = {"accuracy": stat([r["phase1_accuracy"] for r in per_seed]),
                                  "ce": stat([r["phase1_ce"] for r in per_seed])}  # fmt: skip

    def curve(key, label):
        points = []
        for i, point in enumerate(per_seed[0][key]):
            entry = {label: point[label]} if label == "ticks" else {"quantile": point["quantile"]}
            for field in ("threshold", "tick_flops_saved", "delta_ce", "ce"):
                if field in point:
                    entry[field] = stat([r[key][i][field] for r in per_seed])
            points.append(entry)
        return points

    return {
        "arms": arms,
        "ece": {name: arms[name]["ece"] for name in per_seed[0]["ece"]},
        "auroc": {name: arms[name]["auroc_wrong"] for name in per_seed[0].get("auroc", {})},
        "halting_curve": curve("halting_curve", "quantile"),
        "fixed_ticks_curve": curve("fixed_ticks_curve", "ticks"),
        "best_saved_within_0.02_nats": {
            kind: stat([r["best_saved_within_0.02_nats"][kind] for r in per_seed])
            for kind in ("halting", "fixed_ticks")
        },
        "cost": {k: stat([r["cost"][k] for r in per_seed]) for k in per_seed[0]["cost"]},
    }


def format_markdown(results: dict) -> str:
    s = results["summary"]
    lines = [f"# Introspection ({results['settings']['seeds']} seeds; {results['machine']})", "",
             "## Calibration (ECE, lower is better) and error detection (AUROC for 'top-1 is wrong')", "",
             "| score | ECE | AUROC wrong |", "|---|---|---|"]  # fmt: skip
    for name, arm in s["arms"].items():
        if "ece" in arm or "auroc_wrong" in arm:
            ece = format_stat(arm["ece"]) if "ece" in arm else "-"
            auroc = format_stat(arm["auroc_wrong"]) if "auroc_wrong" in arm else "-"
            lines.append(f"| {name} | {ece} | {auroc} |")
    lines += ["", "Readout: " + ", ".join(f"{k}: CE {format_stat(v['ce'])}, acc {format_stat(v['accuracy'])}"
                                          for k, v in s["arms"].items() if "ce" in v), ""]  # fmt: skip
    lines += ["## Adaptive ticks (halting on sync convergence) vs fixed K' < K", "",
              "| arm | threshold | tick FLOPs saved | Δ CE (nats/token) |", "|---|---|---|---|"]  # fmt: skip
    for p in s["halting_curve"]:
        lines.append(f"| halt q={p['quantile']} | {format_stat(p['threshold'])} | {format_stat(p['tick_flops_saved'])} | "
                     f"{format_stat(p['delta_ce'], 4)} |")  # fmt: skip
    for p in s["fixed_ticks_curve"]:
        lines.append(f"| fixed K'={p['ticks']} | - | {format_stat(p['tick_flops_saved'])} | {format_stat(p['delta_ce'], 4)} |")
    best = s["best_saved_within_0.02_nats"]
    lines += ["", f"Most tick FLOPs saved at Δ CE ≤ 0.02: halting {format_stat(best['halting'])}, fixed K' "
              f"{format_stat(best['fixed_ticks'])}.", "",
              "Cost (batch-1 cached greedy decoding, ms/token): " + ", ".join(f"{k}: {format_stat(v, 2)}"
                                                                              for k, v in s["cost"].items()), ""]  # fmt: skip
    if results.get("pictures"):
        lines += ["Pictures: " + ", ".join(Path(p).name for p in results["pictures"]), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, default_out="eval/results/introspection", settings=Settings, quick=QUICK)
    parser.add_argument("--checkpoint", type=Path, help="a phase-2 model folder (with its tokenizer) to evaluate")
    parser.add_argument("--baseline", type=Path, help="the phase-1 model folder of --checkpoint (the control)")
    args = parser.parse_args(argv)
    settings = args.settings
    if args.baseline and not args.checkpoint:
        parser.error("--baseline needs --checkpoint")
    hf_logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.checkpoint:
        tokenizer = load_tokenizer(args.checkpoint)
        splits = austen_splits()
        packed_eval = pack_dataset(splits["validation"], tokenizer, settings.block_size)
        eval_ids = torch.tensor(packed_eval.select(range(min(settings.eval_blocks, len(packed_eval))))["input_ids"])
        data, seeds = (tokenizer, None, eval_ids), [0]
    else:
        data, seeds = prepare_data(settings), list(range(settings.seeds))
    per_seed = []
    for seed in seeds:
        per_seed.append(run_seed(settings, seed, data, args.out, args.checkpoint, args.baseline))
        print(f"seed {seed}: ece {per_seed[-1]['ece']} auroc {per_seed[-1].get('auroc')}", flush=True)
    summary = summarise(per_seed)
    results = {
        "settings": {**asdict(settings), "checkpoint": str(args.checkpoint) if args.checkpoint else None},
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), shared CPU".strip(),
        "seconds": time.perf_counter() - started,
        "per_seed": per_seed,
        "summary": summary,
        **{k: summary[k] for k in ("arms", "ece", "auroc", "halting_curve", "fixed_ticks_curve")},
        "pictures": per_seed[0].get("pictures", []),
    }
    write_results(args.out, results, format_markdown(results))
    print(format_markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
