"""Does the model know when it is wrong? Probes of its internals and a fitted confidence head against what its logits
already know.

A token is correct when the served argmax equals the target. Two data sets, one model per seed each:

    text    held-out Austen (Persuasion), every position: the two-phase model of `eval/introspection.py` (phase 1 a plain
            transformer, phase 2 the last layer's MLP replaced by a CTM block, K=3).
    chain   the chain task's answer tokens (`eval/thinking_tasks.py`'s `ChainTask`, k = 1..4, first asks only): its
            CTM arm at K=4 (one layer, the block's cross-attention makes every hop; trained on k <= 3 with the
            curriculum), where ticks do the work.
    real_text / real_facts (in --set datasets=...): a converted real checkpoint (no thinking layer: logit, residual
            and head arms) on held-out Austen, and on the facts protocol's answers (`eval/facts.py`'s world: each told
            fact's efficacy and paraphrase questions in the chat format, asked with the fact told in an earlier turn
            and without it; the answer is right when the served argmax is the value's first token)

The held-out tokens are split by row (block or item) into a fit half and a test half (per seed). Everything learned
(temperature, probes, head) is fitted on the fit half, which is also the calibration split; every number is on the
test half. Arms (each a P(correct)):

    maxprob, entropy, margin     the served distribution's max-probability, 1 - normalised entropy, top-1 - top-2
    maxprob_ts                   max-probability after temperature scaling (T fitted by NLL on the fit half)
    probe_residual               logistic regression on the final-normed residual stream the head reads (D)
    probe_sync                   ... on the last thinking layer's S_out at the served tick
    probe_ticks                  ... on the certainty of every tick and each tick's change of S_out (per layer)
    <probe>+maxprob              the same with max-probability as an extra input
    head                         the model's confidence head (`ctm_confidence_head="linear"`: readout probabilities,
                                 tick certainties, S_out changes), fitted with a Brier loss on the frozen features

Metrics: `auroc` (P(correct) ranking correct above wrong tokens, i.e. AUROC for "this token is wrong" from
1 - P), `ece` (15 equal-width bins), `brier`. The marker: the rule `mark_unsure` (" (unsure)" after an answer whose
head confidence is below 0.5), its precision and recall at flagging wrong answers, against a max-probability threshold
that flags the same share. AUROC per tick: each tick's certainty alone, and a probe on that tick's S_out.

    python eval/introspection_probes.py [--seeds 3] [--out eval/results/introspection_probes] [--quick]
        [--cache DIR]   trained models are saved to / loaded from DIR/<data set>_seed<N> (training is the slow part)
        [--merge-into DIR]  add the data sets of this run to DIR's results (per seed, summaries, arms; the other
                        data sets' numbers kept) and redraw its results.md and pictures

Writes results.json (settings, per-seed numbers, per data set `arms` with `auroc`, `ece`, `brier` as {"mean", "sd"},
`goal`, `marker`), results.md and reliability.png, auroc_per_tick.png to --out.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: extra threads only spin

import numpy  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import experiment_parser, format_stat, stat, write_results  # noqa: E402
from introspection import expected_calibration_error, prepare_data  # noqa: E402  (sibling modules)
from introspection_features import (  # noqa: E402
    TEMPERATURES,
    chain_rows,
    facts_rows,
    real_rows,
    text_rows,
    text_settings,
    token_table,
)
from machine import MachineLoad  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.metrics import brier_score_loss, roc_auc_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm.confidence_ctm import add_confidence_head, mark_unsure  # noqa: E402
from modeling_ctm.training.confidence import fit_confidence_head  # noqa: E402


BASELINES = ("maxprob", "maxprob_ts", "entropy", "margin")
PROBES = ("probe_residual", "probe_sync", "probe_ticks")
ARMS = (*BASELINES, *PROBES, *(f"{p}+maxprob" for p in PROBES), "head")
METRICS = ("auroc", "ece", "brier")


@dataclass
class Settings:
    seeds: int = 3
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (one process per seed, sharing --cache)
    datasets: str = "text,chain"  # comma-separated, of text, chain, real_text, real_facts
    bins: int = 15
    marker_threshold: float = 0.5
    # the logistic probes' L2 strength is chosen per fit by 5-fold cross-validated log loss on the fit half among
    # `probe_cs` values of C (log-spaced 1e-4 .. 1e4): a 576-wide residual on ~1000 tokens overfits at a fixed C=1
    probe_cs: int = 9
    # text: the model of eval/introspection.py
    text_phase1_steps: int = 500
    text_phase2_steps: int = 300
    text_eval_blocks: int = 64
    # chain: the K=4 CTM arm of eval/thinking_tasks.py (chain 15 nodes / 3 chains, curriculum, k <= 3 trained)
    chain_ticks: int = 4
    chain_steps: int = 900
    chain_train_hops: int = 3
    chain_test_hops: int = 4
    chain_eval_rows: int = 128
    # real_text (in --set datasets=...): a real checkpoint scored on held-out Austen; it has no thinking layer:
    # residual and logit arms only
    real_checkpoint: str = "smollm2-135m-instruct"  # a CTM folder, or an offline source converted exactly (from_llama)
    real_blocks: int = 16
    real_block_size: int = 128
    # real_facts: told subjects (3 relations each) of the facts protocol's world, and the world's seed
    facts_subjects: int = 16
    facts_world_seed: int = 0


QUICK = dict(seeds=1, text_phase1_steps=4, text_phase2_steps=4, text_eval_blocks=8, chain_steps=6, chain_eval_rows=8,
             facts_subjects=4)


# ----------------------------------------------------------------------------------------------------------------------
# Arms and metrics
# ----------------------------------------------------------------------------------------------------------------------


def metrics(confidence: numpy.ndarray, correct: numpy.ndarray, bins: int) -> dict:
    """AUROC of P(correct) for correct vs wrong (NaN when one class is absent), ECE (`bins` equal-width), Brier."""
    confidence = numpy.clip(confidence, 0.0, 1.0)
    auroc = roc_auc_score(correct, confidence) if 0 < correct.sum() < len(correct) else float("nan")
    ece, table = expected_calibration_error(confidence, correct, bins)
    return {"auroc": float(auroc), "ece": ece, "brier": float(brier_score_loss(correct, confidence)), "_bins": table}


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature minimising the NLL of the targets (Guo et al. 2017), by L-BFGS on log T."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def logistic_probe(train_x, train_y, test_x, cs: int) -> numpy.ndarray:
    """P(correct) on test_x from a standardised L2 logistic regression fitted on (train_x, train_y), its strength
    chosen by cross-validation on the training rows."""
    counts = numpy.bincount(train_y.astype(int), minlength=2)
    if counts.min() < 5:  # too few of one class to cross-validate (a --quick run): the base rate is all it can say
        return numpy.full(len(test_x), float(train_y.mean()))
    folds = int(min(5, counts.min()))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=cs, cv=folds, scoring="neg_log_loss", max_iter=2000))
    return model.fit(train_x, train_y).predict_proba(test_x)[:, 1]


def score_arms(table: dict, fit: numpy.ndarray, settings: Settings, model) -> tuple[dict, dict, dict]:
    """Every arm's P(correct) on the test rows, their metrics, and the temperature / head fit."""
    test = ~fit
    correct = table["correct"].numpy()
    if "logits" in table:
        probs = F.softmax(table["logits"], dim=-1)
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / numpy.log(probs.shape[-1])
        temperature = fit_temperature(table["logits"][fit], table["target"][fit])
        scaled_maxprob = F.softmax(table["logits"] / temperature, dim=-1).max(-1).values.numpy()
    else:  # the temperature grid of `plain_token_table`
        top, entropy = table["probs_top2"], table["entropy"]
        best = int(table["nll_grid"][fit].mean(0).argmin())
        temperature = float(TEMPERATURES[best])
        scaled_maxprob = table["maxprob_grid"][:, best].numpy()
    maxprob = top[:, 0].numpy()
    conf = {
        "maxprob": maxprob,
        "maxprob_ts": scaled_maxprob,
        "entropy": (1 - entropy).numpy(),
        "margin": (top[:, 0] - top[:, 1]).numpy(),
    }
    conf = {name: values[test] for name, values in conf.items()}
    features = {"probe_residual": "residual", "probe_sync": "sync", "probe_ticks": "ticks"}
    features = {arm: key for arm, key in features.items() if key in table}
    for arm, key in features.items():
        x = table[key].float().numpy()
        conf[arm] = logistic_probe(x[fit], correct[fit], x[test], settings.probe_cs)
        x = numpy.concatenate([x, maxprob[:, None]], axis=1)
        conf[f"{arm}+maxprob"] = logistic_probe(x[fit], correct[fit], x[test], settings.probe_cs)
    head = add_confidence_head(model)
    fitted = fit_confidence_head(head, table["head_features"][fit], table["correct"][fit])
    with torch.no_grad():
        conf["head"] = head(table["head_features"][test]).numpy()
    scores = {arm: metrics(conf[arm], correct[test], settings.bins) for arm in ARMS if arm in conf}
    return scores, conf, {"temperature": temperature, **fitted}


def marker_report(conf: dict, correct: numpy.ndarray, threshold: float) -> dict:
    """The marker flags an answer whose head confidence is below `threshold` (`mark_unsure`); the control flags the
    same number of answers with the lowest max-probability. Precision: wrong among flagged; recall: flagged among
    wrong."""
    wrong = correct == 0
    marked = numpy.array([mark_unsure("", float(c), threshold) != "" for c in conf["head"]])
    share = float(marked.mean())
    order = numpy.argsort(conf["maxprob"], kind="stable")
    control = numpy.zeros_like(marked)
    control[order[: int(marked.sum())]] = True

    def pr(flags):
        precision = float(wrong[flags].mean()) if flags.any() else float("nan")
        recall = float(flags[wrong].mean()) if wrong.any() else float("nan")
        return {"precision": precision, "recall": recall}

    return {"flag_rate": share, "error_rate": float(wrong.mean()), "head": pr(marked), "maxprob_same_rate": pr(control)}


def per_tick_auroc(table: dict, fit: numpy.ndarray, settings: Settings) -> dict:
    """Per tick k: AUROC of tick k's certainty alone, and of a probe on tick k's S_out."""
    correct = table["correct"].numpy()
    test = ~fit
    result = {"certainty": [], "probe_sync": []}
    if "certainty_per_tick" not in table or not 0 < correct[test].sum() < test.sum():
        return result
    for k in range(table["certainty_per_tick"].shape[1]):
        result["certainty"].append(float(roc_auc_score(correct[test], table["certainty_per_tick"][test, k].numpy())))
        x = table["sync_per_tick"][:, k].numpy()
        probe = logistic_probe(x[fit], correct[fit], x[test], settings.probe_cs)
        result["probe_sync"].append(float(roc_auc_score(correct[test], probe)))
    return result


def confidence_cost(model, prompt: torch.Tensor, tokens: int = 16, repeats: int = 3) -> dict:
    """Cached greedy decoding, ms per token, with `output_confidence` off and on (interleaved; medians), and what the
    head holds."""
    times = {"off": [], "on": []}
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, return_dict_in_generate=True)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    for _ in range(repeats):
        for mode in ("off", "on"):
            started = time.perf_counter()
            model.generate(prompt, output_confidence=mode == "on", **kwargs)
            times[mode].append(1000 * (time.perf_counter() - started) / tokens)
    head = model.confidence_head
    return {
        "decode_ms_per_token_off": float(numpy.median(times["off"])),
        "decode_ms_per_token_on": float(numpy.median(times["on"])),
        "head_parameters": int(head.weight.numel() + head.bias.numel()),
    }


def run_dataset(name: str, model, ids, mask, targets, settings: Settings, seed: int, table=None) -> dict:
    """One data set, one seed. `table`: the per-token table when already computed (a frozen model's is the same every
    seed; only the fit/test split is re-drawn)."""
    started = time.perf_counter()
    table = token_table(model, ids, mask, targets) if table is None else table
    rows = table["row"].numpy()
    fit_rows = numpy.random.default_rng(seed).permutation(len(ids))[: len(ids) // 2]
    fit = numpy.isin(rows, fit_rows)
    scores, conf, fitted = score_arms(table, fit, settings, model)
    correct = table["correct"].numpy()[~fit]
    result = {
        "tokens_fit": int(fit.sum()),
        "tokens_test": int((~fit).sum()),
        "accuracy_test": float(correct.mean()),
        **({"accuracy_test_told": float(correct[table["told"].numpy()[~fit]].mean()),
            "accuracy_test_untold": float(correct[~table["told"].numpy()[~fit]].mean())} if "told" in table else {}),
        **fitted,
        "arms": {arm: {m: s[m] for m in METRICS} for arm, s in scores.items()},
        "reliability": {arm: scores[arm]["_bins"] for arm in ("maxprob", "maxprob_ts", "head")},
        "marker": marker_report(conf, correct, settings.marker_threshold),
        "auroc_per_tick": per_tick_auroc(table, fit, settings),
        "seconds": time.perf_counter() - started,
    }
    if seed == settings.first_seed:
        result["cost"] = confidence_cost(model, ids[:1, : max(2, ids.shape[1] // 2)])
    base = result["arms"]["maxprob"]["auroc"]
    result["gain_over_maxprob"] = {arm: v["auroc"] - base for arm, v in result["arms"].items() if arm != "maxprob"}
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Summary, table, pictures
# ----------------------------------------------------------------------------------------------------------------------

DATASETS = ("text", "chain", "real_text", "real_facts")
GOALS = {"text": 0.02, "chain": 0.05}  # AUROC a sync or tick feature must add over max-probability


def summarise(per_seed: list[dict], name: str) -> dict:
    runs = [r[name] for r in per_seed]
    arms = {arm: {m: stat([r["arms"][arm][m] for r in runs]) for m in METRICS} for arm in ARMS if arm in runs[0]["arms"]}
    gains = {arm: stat([r["gain_over_maxprob"][arm] for r in runs]) for arm in runs[0]["gain_over_maxprob"]}
    tick_arms = [a for a in ("probe_sync", "probe_ticks", "probe_sync+maxprob", "probe_ticks+maxprob") if a in gains]
    best = max(tick_arms, key=lambda a: gains[a]["mean"]) if tick_arms else None
    goal = {
        "required_auroc_gain": GOALS.get(name),
        "best_sync_or_tick_arm": best,
        "its_gain_over_maxprob": gains[best] if best else None,
        "residual_probe_gain": gains["probe_residual+maxprob"],
        "met_auroc": best is not None and GOALS.get(name) is not None and gains[best]["mean"] >= GOALS[name],
        "head_ece_le_maxprob_ts": arms["head"]["ece"]["mean"] <= arms["maxprob_ts"]["ece"]["mean"],
    }
    marker = {
        "flag_rate": stat([r["marker"]["flag_rate"] for r in runs]),
        "error_rate": stat([r["marker"]["error_rate"] for r in runs]),
        **{who: {m: stat([r["marker"][who][m] for r in runs]) for m in ("precision", "recall")}
           for who in ("head", "maxprob_same_rate")},
    }  # fmt: skip
    ticks = {kind: [stat([r["auroc_per_tick"][kind][k] for r in runs if r["auroc_per_tick"][kind]])
                    for k in range(len(runs[0]["auroc_per_tick"][kind]))] for kind in ("certainty", "probe_sync")}  # fmt: skip
    return {
        "arms": arms,
        "gain_over_maxprob": gains,
        "goal": goal,
        "marker": marker,
        "auroc_per_tick": ticks,
        "accuracy_test": stat([r["accuracy_test"] for r in runs]),
        **{key: stat([r[key] for r in runs]) for key in ("accuracy_test_told", "accuracy_test_untold") if key in runs[0]},
        "tokens_test": [r["tokens_test"] for r in runs],
        "temperature": stat([r["temperature"] for r in runs]),
        "cost": runs[0].get("cost"),
    }


def draw(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["settings"]["datasets"].split(",") if n in results]
    pictures = []
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        seed0 = results["per_seed"][0][name]["reliability"]
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        for arm, style in (("maxprob", "o-"), ("maxprob_ts", "s--"), ("head", "^-")):
            table = seed0[arm]
            ece = results[name]["arms"][arm]["ece"]
            ax.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], style, ms=4,
                    label=f"{arm} (ECE {format_stat(ece)})")  # fmt: skip
        ax.set(title=f"{name}: reliability (seed 0, test half)", xlabel="confidence", ylabel="accuracy",
               xlim=(0, 1), ylim=(0, 1))  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    pictures.append(str(out / "reliability.png"))
    with_ticks = [n for n in names if results[n]["auroc_per_tick"]["certainty"]] or names[:1]
    fig, axes = plt.subplots(1, len(with_ticks), figsize=(4.5 * len(with_ticks), 4.2), squeeze=False)
    for ax, name in zip(axes[0], with_ticks):
        ticks = results[name]["auroc_per_tick"]
        for kind, style in (("certainty", "o-"), ("probe_sync", "s-")):
            if ticks[kind]:
                means = [p["mean"] for p in ticks[kind]]
                sds = [p["sd"] for p in ticks[kind]]
                ax.errorbar(range(len(means)), means, yerr=sds, fmt=style, ms=4, capsize=3, label=kind)
        base = results[name]["arms"]["maxprob"]["auroc"]["mean"]
        ax.axhline(base, color="0.4", ls="--", lw=1, label="served max-probability")
        ax.set(title=f"{name}: AUROC per tick", xlabel="tick", ylabel="AUROC (correct vs wrong)",
               xticks=range(len(ticks["certainty"])))  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "auroc_per_tick.png", dpi=110)
    plt.close(fig)
    pictures.append(str(out / "auroc_per_tick.png"))
    return pictures


def format_markdown(results: dict) -> str:
    lines = [f"# Does the model know when it is wrong? ({results['settings']['seeds']} seeds; {results['machine']})", ""]
    for name in results["settings"]["datasets"].split(","):
        if name not in results:
            continue
        s = results[name]
        lines += [f"## {name}: test accuracy {format_stat(s['accuracy_test'])}, test tokens {s['tokens_test']}, "
                  f"temperature {format_stat(s['temperature'], 2)}", "",
                  "| arm | AUROC | ECE (15 bins) | Brier | AUROC − maxprob |", "|---|---|---|---|---|"]  # fmt: skip
        for arm, a in s["arms"].items():
            gain = format_stat(s["gain_over_maxprob"][arm]) if arm in s["gain_over_maxprob"] else "-"
            lines.append(f"| {arm} | {format_stat(a['auroc'])} | {format_stat(a['ece'])} | {format_stat(a['brier'])} "
                         f"| {gain} |")  # fmt: skip
        g, m = s["goal"], s["marker"]
        best = g["best_sync_or_tick_arm"]
        lines += ["", (f"Goal: best sync/tick arm `{best}` adds {format_stat(g['its_gain_over_maxprob'])} AUROC over "
                       f"maxprob (required {g['required_auroc_gain']}: {'met' if g['met_auroc'] else 'not met'}); "
                       if best else "No thinking layer: no sync or tick arm; ") + "the residual probe +maxprob adds "
                  f"{format_stat(g['residual_probe_gain'])}. Head ECE ≤ maxprob_ts ECE: {g['head_ece_le_maxprob_ts']}.",
                  "", f"Marker (\" (unsure)\" when the head's confidence < {results['settings']['marker_threshold']}): "
                  f"flags {format_stat(m['flag_rate'])} of answers (error rate {format_stat(m['error_rate'])}); "
                  f"precision {format_stat(m['head']['precision'])}, recall {format_stat(m['head']['recall'])}; "
                  f"max-probability at the same flag rate: precision {format_stat(m['maxprob_same_rate']['precision'])}, "
                  f"recall {format_stat(m['maxprob_same_rate']['recall'])}.", "",
                  "AUROC per tick: certainty " + ", ".join(format_stat(p) for p in s["auroc_per_tick"]["certainty"])
                  + "; S_out probe " + ", ".join(format_stat(p) for p in s["auroc_per_tick"]["probe_sync"]), ""]  # fmt: skip
    for name in results["settings"]["datasets"].split(","):
        cost = results.get(name, {}).get("cost")
        if cost:
            lines.append(f"Cost ({name} model, seed 0, cached greedy decoding, batch 1): output_confidence off "
                         f"{cost['decode_ms_per_token_off']:.1f} ms/token, on {cost['decode_ms_per_token_on']:.1f} "
                         f"ms/token; the head holds {cost['head_parameters']} numbers.")  # fmt: skip
    lines += ["", f"Load: {results.get('load')}", f"Seconds: {results['seconds']:.0f}", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__, default_out="eval/results/introspection_probes", settings=Settings,
                               quick=QUICK)  # fmt: skip
    parser.add_argument("--cache", type=Path, help="folder the trained models are saved to and loaded from")
    parser.add_argument("--merge-into", type=Path, help="a results folder this run's data sets are added to")
    args = parser.parse_args(argv)
    settings = args.settings
    settings.seeds = args.seeds
    names = settings.datasets.split(",")
    bad = [n for n in names if n not in DATASETS]
    if bad:
        parser.error(f"--set datasets={settings.datasets!r}: allowed data sets are {', '.join(DATASETS)}")
    hf_logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load = MachineLoad()
    load_before = load.sample()
    data = prepare_data(text_settings(settings, args.quick)) if "text" in names else None
    per_seed, real, facts = [], None, None
    for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
        record = {"seed": seed}
        if "text" in names:
            model, ids, mask, targets, loaded = text_rows(settings, seed, data, args.cache, args.quick)
            record["text"] = {"loaded_from_cache": loaded, **run_dataset("text", model, ids, mask, targets, settings,
                                                                         seed)}  # fmt: skip
        if "chain" in names:
            model, ids, mask, targets, loaded, _ = chain_rows(settings, seed, args.cache)
            record["chain"] = {"loaded_from_cache": loaded, **run_dataset("chain", model, ids, mask, targets, settings,
                                                                          seed)}  # fmt: skip
        if "real_text" in names:
            if real is None:
                real = real_rows(settings)
                real = (*real, token_table(*real))
            record["real_text"] = run_dataset("real_text", *real[:4], settings, seed, table=real[4])
        if "real_facts" in names:
            facts = facts_rows(settings) if facts is None else facts
            record["real_facts"] = run_dataset("real_facts", facts[0], facts[1], None, None, settings, seed,
                                               table=facts[2])  # fmt: skip
        per_seed.append(record)
        print(f"seed {seed}: " + "; ".join(f"{n} maxprob {record[n]['arms']['maxprob']['auroc']:.3f} head "
                                           f"{record[n]['arms']['head']['auroc']:.3f}" for n in names), flush=True)  # fmt: skip
    results = {
        "settings": asdict(settings),
        "machine": f"{platform.machine()} torch {torch.__version__}, {torch.get_num_threads()} thread(s), shared CPU",
        "per_seed": per_seed,
        **{name: summarise(per_seed, name) for name in names},
    }
    results["arms"] = {f"{name}:{arm}": value for name in names for arm, value in results[name]["arms"].items()}
    results["seconds"] = time.perf_counter() - started
    foreign = load.foreign(load_before, load.sample())
    results["load"] = {"other_processes_share_of_machine": foreign, "loadavg_1_5_15": list(os.getloadavg())}
    results["pictures"] = draw(results, args.out)
    write_results(args.out, results, format_markdown(results))
    print(format_markdown(results))
    if args.merge_into is not None:
        merge_results(results, args.merge_into)
    return results


def merge_results(results: dict, folder: Path) -> dict:
    """Add `results`' data sets to `folder`'s results.json (per seed by seed number, summaries, `arms`, the data set
    list; a data set of the same name is replaced), note the run that added them, and rewrite results.md and the
    pictures there. The other data sets' numbers are kept as they were."""
    import json

    merged = json.loads((folder / "results.json").read_text())
    names = results["settings"]["datasets"].split(",")
    old_seeds = {record["seed"]: record for record in merged["per_seed"]}
    missing = [r["seed"] for r in results["per_seed"] if r["seed"] not in old_seeds]
    if missing:
        raise ValueError(f"seeds {missing} are not in {folder / 'results.json'}: merge runs of the same seeds")
    for record in results["per_seed"]:
        old_seeds[record["seed"]].update({name: record[name] for name in names})
    kept = [n for n in merged["settings"]["datasets"].split(",") if n not in names]
    merged["settings"]["datasets"] = ",".join(kept + names)
    for name in names:
        merged[name] = results[name]
        merged["arms"] = {k: v for k, v in merged["arms"].items() if not k.startswith(f"{name}:")}
        merged["arms"].update({f"{name}:{arm}": value for arm, value in results[name]["arms"].items()})
    merged.setdefault("merged_runs", []).append({"datasets": names, "settings": results["settings"],
                                                 "seconds": results["seconds"], "load": results["load"]})  # fmt: skip
    merged["pictures"] = draw(merged, folder)
    markdown = format_markdown(merged)
    for run in merged["merged_runs"]:
        markdown += (f"Added later: {', '.join(run['datasets'])} ({run['seconds']:.0f} s; load {run['load']}).\n")
    write_results(folder, merged, markdown)
    return merged


if __name__ == "__main__":
    main(sys.argv[1:])
