"""The trained marker: the model writes " (unsure)" itself after an answer its confidence head scores low, and how
well that flags its wrong answers against a max-probability threshold at the same flag rate.

Setting: the chain task's answers (first asks, k = 1..4) on the K=4 CTM of `eval/introspection_probes.py` (loaded
from --models DIR/chain_seed<N>, else trained there). Per seed, three disjoint sets of rows: `train` (fresh rows: the
recipe's data), `calibration` (fresh rows: the confidence head is fitted on them with a Brier loss, and the
threshold chosen so that it flags `flag_rate` of their answers; by default their error rate), `test` (the held-out
evaluation rows of the chain task: every number below).

The recipe (`modeling_ctm.training.marker`): after each training answer, as the model served it, the target is the
new marker token when the head's confidence is below the threshold, else a new end token; the answer's own target
is the true answer. Arms (what the fine-tune trains, with Trainer + PEFT, merged back):

    rows      only the marker and end tokens' rows of the tied embedding / readout (2 x D numbers)
    lora      those rows and a rank-`lora_rank` LoRA on the thinking block's query, value and S_out readout
    twin      the fused form (`add_unsure_twins`): per answer token a twin token meaning "that answer (unsure)",
              written in the answer's place when the head's confidence is low; only the twins' rows are trained.
              The marker is then decided at the position whose features the head reads; in the rows/lora arms it is
              decided one token later, from the served answer's position, where this one-layer model's state holds
              little of the question's difficulty
    head_rule the rule the model is not trained on (`mark_unsure`: the head's confidence < threshold), for reference

Per arm, on the test answers, the model generates greedily after the question (answer, then one token; the twin
arm: one token): the marker is written when that token is the marker (a twin). Metrics: `precision` (wrong among
flagged), `recall` (flagged among wrong), `flag_rate`; `maxprob_precision` / `maxprob_recall`: the untouched model's
lowest max-probabilities flagging as many answers; `accuracy_before` / `accuracy_after` (the untouched model's served
answer, the fine-tuned model's generated one); `agreement_with_head`: the marker written exactly when the head's rule
flags. `verdict_probe_auroc`: where the head's verdict is in the model's state (`where_the_verdict_is`).

    python eval/introspection_marker.py [--seeds 3] [--out docs/results/introspection-marker] [--quick]
        [--models DIR]   the chain models (DIR/chain_seed<N>, as --cache of introspection_probes.py)
        [--save DIR]     save the first seed's `save_arm` model (head and marker included): it then writes its own
                         marker in `generate` and in `ctm chat --show-confidence`
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


torch.set_num_threads(1)

import numpy  # noqa: E402
from harness import experiment_parser, format_stat, stat, write_results  # noqa: E402  (sibling modules)
from introspection_features import chain_rows  # noqa: E402
from introspection_probes import Settings as ProbeSettings  # noqa: E402
from machine import MachineLoad  # noqa: E402
from thinking_generators import ChainTask  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm.confidence_ctm import CTMConfidenceRecorder, add_confidence_head, mark_unsure  # noqa: E402
from modeling_ctm.io_ctm import save_folder_atomically  # noqa: E402
from modeling_ctm.training.confidence import fit_confidence_head  # noqa: E402
from modeling_ctm.training.marker import (  # noqa: E402
    add_marker_tokens,
    add_unsure_twins,
    marker_examples,
    train_marker,
    twin_examples,
    unsure_threshold,
    wrote_unsure,
)


ARMS = ("rows", "lora", "twin", "head_rule")
METRICS = ("precision", "recall", "flag_rate", "maxprob_precision", "maxprob_recall", "accuracy_before",
           "accuracy_after", "agreement_with_head")  # fmt: skip


@dataclass
class Settings:
    seeds: int = 3
    first_seed: int = 0
    arms: str = "rows,lora,twin"  # the fine-tuned arms to run (head_rule is always reported)
    train_rows: int = 512
    calibration_rows: int = 256
    flag_rate: float | None = None  # None: the calibration split's error rate
    steps: int = 250
    batch_size: int = 32
    learning_rate: float = 2e-2
    lora_rank: int = 4
    save_arm: str = "lora"
    # the chain models (as eval/introspection_probes.py trains them when --models has none)
    chain_steps: int = 900
    chain_eval_rows: int = 128


QUICK = dict(seeds=1, train_rows=16, calibration_rows=16, steps=4, batch_size=8, chain_steps=6, chain_eval_rows=8)


def answer_items(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain batch -> (ids (N, T), scored (N, T - 1): the positions whose next token is a first-ask answer)."""
    ids = torch.as_tensor(batch["input_ids"])
    mask = torch.as_tensor(batch["labels"])[:, 1:] != -100
    keep = mask.clone()
    keep[mask] = torch.as_tensor(batch["scored"].reshape(-1))
    return ids, keep


@torch.no_grad()
def answer_table(model, ids: torch.Tensor, keep: torch.Tensor, batch_size: int = 128) -> dict:
    """Per scored answer: its row and position, the served answer, max-probability, the true answer and the head's
    features (one full forward per batch under the observer `generate(output_confidence=True)` uses)."""
    parts: dict[str, list] = {}
    for start in range(0, len(ids), batch_size):
        block, mask = ids[start : start + batch_size], keep[start : start + batch_size]
        recorder = CTMConfidenceRecorder(model.config)
        with model.observing(recorder):
            logits = model(block, use_cache=False).logits[:, :-1].float()
        rows, columns = mask.nonzero(as_tuple=True)
        values = {
            "row": rows + start,
            "column": columns,
            "served": logits.argmax(-1)[mask],
            "maxprob": logits.softmax(-1).max(-1).values[mask],
            "answer": block[:, 1:][mask],
            "features": recorder.features[0][:, :-1][mask],
        }
        for name, value in values.items():
            parts.setdefault(name, []).append(value)
    table = {name: torch.cat(value) for name, value in parts.items()}
    table["correct"] = (table["served"] == table["answer"]).float()
    return table


@torch.no_grad()
def generate_after(model, ids: torch.Tensor, table: dict, unsure_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy answer and one more token after every scored question (grouped by position: equal-length prompts).
    Returns (the generated answer, whether the marker followed it), in `table`'s order."""
    answer = torch.empty_like(table["answer"])
    marked = torch.zeros(len(answer), dtype=torch.bool)
    for column in table["column"].unique().tolist():
        where = (table["column"] == column).nonzero(as_tuple=True)[0]
        prompt = ids[table["row"][where], : column + 1]
        out = model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        answer[where] = out[:, column + 1]
        marked[where] = wrote_unsure(out[:, column + 2 :], unsure_id)
    return answer, marked


@torch.no_grad()
def generate_twin(model, ids: torch.Tensor, table: dict, twins: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused form: one greedy token after every scored question; a twin is its answer written with the marker."""
    back = {twin: answer for answer, twin in twins.items()}
    answer = torch.empty_like(table["answer"])
    marked = torch.zeros(len(answer), dtype=torch.bool)
    for column in table["column"].unique().tolist():
        where = (table["column"] == column).nonzero(as_tuple=True)[0]
        out = model.generate(ids[table["row"][where], : column + 1], max_new_tokens=1, do_sample=False, pad_token_id=0)
        token = out[:, -1].tolist()
        answer[where] = torch.tensor([back.get(t, t) for t in token])
        marked[where] = torch.tensor([t in back for t in token])
    return answer, marked


@torch.no_grad()
def where_the_verdict_is(model, ids: torch.Tensor, table: dict, low: numpy.ndarray, cs: int = 9) -> dict:
    """How well a linear readout of the final-normed state tells the head's verdict (`low`: confidence below the
    threshold) at the question's position (where the answer, and a twin, is chosen) and at the served answer's
    position (where the rows/lora arms' marker is chosen): AUROC of a cross-validated logistic probe, fitted on half
    the answers and scored on the other half."""
    from introspection_probes import logistic_probe
    from sklearn.metrics import roc_auc_score

    caught = {}
    hook = model.model.norm.register_forward_hook(lambda module, args, output: caught.update(state=output))
    question, answer = [None] * len(low), [None] * len(low)
    try:
        for column in table["column"].unique().tolist():
            where = (table["column"] == column).nonzero(as_tuple=True)[0]
            prompt = ids[table["row"][where], : column + 2].clone()
            prompt[:, -1] = table["served"][where]  # the answer as the model served it
            model(prompt, use_cache=False)
            state = caught["state"].flatten(2)  # (B, T, ...): a thinking last layer normalises every tick's output
            for i, index in enumerate(where.tolist()):
                question[index], answer[index] = state[i, -2], state[i, -1]
    finally:
        hook.remove()
    question, answer = torch.stack(question), torch.stack(answer)
    fit = numpy.random.default_rng(0).permutation(len(low)) < len(low) // 2
    result = {}
    for name, states in (("question_position", question), ("answer_position", answer)):
        x = states.numpy()
        result[name] = float(roc_auc_score(low[~fit], logistic_probe(x[fit], low[fit].astype(float), x[~fit], cs)))
    return result


def precision_recall(flags: numpy.ndarray, wrong: numpy.ndarray) -> tuple[float, float]:
    precision = float(wrong[flags].mean()) if flags.any() else float("nan")
    recall = float(flags[wrong].mean()) if wrong.any() else float("nan")
    return precision, recall


def arm_metrics(marked: numpy.ndarray, wrong: numpy.ndarray, maxprob: numpy.ndarray, head_flags: numpy.ndarray,
                accuracy_before: float, accuracy_after: float) -> dict:  # fmt: skip
    """The marker's precision / recall at flagging `wrong` answers, and the control: the `marked.sum()` answers of
    lowest max-probability."""
    control = numpy.zeros_like(marked)
    control[numpy.argsort(maxprob, kind="stable")[: int(marked.sum())]] = True
    precision, recall = precision_recall(marked, wrong)
    control_precision, control_recall = precision_recall(control, wrong)
    return {"precision": precision, "recall": recall, "flag_rate": float(marked.mean()),
            "maxprob_precision": control_precision, "maxprob_recall": control_recall,
            "accuracy_before": accuracy_before, "accuracy_after": accuracy_after,
            "agreement_with_head": float((marked == head_flags).mean())}  # fmt: skip


def run_seed(settings: Settings, seed: int, models: Path | None, save: Path | None) -> dict:
    started = time.perf_counter()
    task = ChainTask(nodes=15, chains=3)
    probe_settings = ProbeSettings(chain_steps=settings.chain_steps, chain_eval_rows=settings.chain_eval_rows)
    model, test_ids, test_keep, _, loaded, _ = chain_rows(probe_settings, seed, models)
    hops = list(range(1, probe_settings.chain_test_hops + 1))
    train_ids, train_keep = answer_items(task.sample(settings.train_rows, hops, numpy.random.default_rng(20_000 + seed)))
    calibration = task.sample(settings.calibration_rows, hops, numpy.random.default_rng(30_000 + seed))
    calibration = answer_table(model, *answer_items(calibration))
    head = add_confidence_head(model)
    fitted = fit_confidence_head(head, calibration["features"], calibration["correct"])
    with torch.no_grad():
        calibration_confidence = head(calibration["features"])
    flag_rate = settings.flag_rate if settings.flag_rate is not None else float(1 - calibration["correct"].mean())
    threshold = unsure_threshold(calibration_confidence, flag_rate)

    train = answer_table(model, train_ids, train_keep)
    with torch.no_grad():
        train_confidence = head(train["features"])
    prefixes = [train_ids[r, : c + 1].tolist() for r, c in zip(train["row"].tolist(), train["column"].tolist())]

    test = answer_table(model, test_ids, test_keep)
    with torch.no_grad():
        test_confidence = head(test["features"]).numpy()
    head_flags = numpy.array([mark_unsure("", float(c), threshold) != "" for c in test_confidence])
    wrong_before = test["correct"].numpy() == 0
    accuracy_before = float(test["correct"].mean())
    maxprob = test["maxprob"].numpy()
    result = {
        "loaded_from_cache": loaded,
        "answers": {"train": len(train["row"]), "calibration": len(calibration["row"]), "test": len(test["row"])},
        "flag_rate_target": flag_rate,
        "threshold": threshold,
        **fitted,
        "arms": {"head_rule": arm_metrics(head_flags, wrong_before, maxprob, head_flags, accuracy_before,
                                          accuracy_before)},  # fmt: skip
        "train_unsure_share": None,
        "curves": {},
    }
    result["verdict_probe_auroc"] = where_the_verdict_is(model, test_ids, test, head_flags)
    for arm in [a for a in settings.arms.split(",") if a]:
        tuned = copy.deepcopy(model)
        twins = None
        if arm == "twin":
            twins = add_unsure_twins(tuned, range(task.answer_base, task.vocab_size))
            examples = twin_examples(prefixes, train["answer"].tolist(), train_confidence, threshold, twins)
        else:
            unsure_id, end_id = add_marker_tokens(tuned)
            examples = marker_examples(prefixes, train["served"].tolist(), train["answer"].tolist(), train_confidence,
                                       threshold, unsure_id, end_id)  # fmt: skip
        result["train_unsure_share"] = float(numpy.mean([e["unsure"] for e in examples]))
        arm_started = time.perf_counter()
        tuned, curve = train_marker(tuned, examples, steps=settings.steps, batch_size=settings.batch_size,
                                    learning_rate=settings.learning_rate,
                                    lora_rank=settings.lora_rank if arm == "lora" else 0, seed=seed,
                                    verdict_ids=list(twins.values()) if twins else None)  # fmt: skip
        seconds = time.perf_counter() - arm_started
        answer, marked = generate_twin(tuned, test_ids, test, twins) if twins else generate_after(tuned, test_ids,
                                                                                                   test, unsure_id)
        correct_after = answer == test["answer"]
        marked = marked.numpy()
        result["arms"][arm] = arm_metrics(marked, ~correct_after.numpy(), maxprob, head_flags, accuracy_before,
                                          float(correct_after.float().mean()))  # fmt: skip
        result["arms"][arm]["train_seconds"] = seconds
        result["curves"][arm] = curve
        print(f"seed {seed} {arm}: {result['arms'][arm]} ({seconds:.0f} s)", flush=True)
        if save is not None and arm == settings.save_arm and seed == settings.first_seed:
            save_folder_atomically(tuned.save_pretrained, str(save))
            result["saved"] = save.name  # the folder name only: results travel without the machine's paths
    result["seconds"] = time.perf_counter() - started
    return result


def format_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# The trained unsure marker on chain answers ({s['seeds']} seeds; {results['machine']})", "",
             f"Flag rate target {format_stat(results['flag_rate_target'])} (the calibration split's error rate unless "
             f"set), head threshold {format_stat(results['threshold'])}; fine-tune {s['steps']} steps, batch "
             f"{s['batch_size']}, lr {s['learning_rate']}, LoRA rank {s['lora_rank']}.", "",
             "| arm | precision | recall | flag rate | maxprob precision (same rate) | maxprob recall (same rate) "
             "| accuracy before | accuracy after | agreement with head rule |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, a in results["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(format_stat(a[m]) for m in METRICS) + " |")
    probe = results.get("verdict_probe_auroc")
    if probe:
        lines += ["", "Where the head's verdict is in the model's state (AUROC of a linear probe for 'confidence < "
                  f"threshold'): at the question's position {format_stat(probe['question_position'])}, at the served "
                  f"answer's position {format_stat(probe['answer_position'])}."]  # fmt: skip
    lines += ["", f"Load: {results['load']}", f"Seconds: {results['seconds']:.0f}", ""]
    return "\n".join(lines)


def marker_parser():
    parser = experiment_parser(__doc__, default_out="eval/results/introspection_marker", settings=Settings,
                               quick=QUICK)  # fmt: skip
    parser.add_argument("--models", type=Path, help="folder holding the chain models (chain_seed<N>)")
    parser.add_argument("--save", type=Path, help="save the first seed's save_arm model here")
    return parser


def main(argv=None) -> dict:
    parser = marker_parser()
    args = parser.parse_args(argv)
    settings = args.settings  # --seeds is in it already (experiment_settings)
    bad = [arm for arm in settings.arms.split(",") if arm not in ("", "rows", "lora", "twin")]
    if bad:
        parser.error(f"--set arms={settings.arms!r}: allowed arms are rows, lora, twin")
    hf_logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    load = MachineLoad()
    load_before = load.sample()
    started = time.perf_counter()
    per_seed = []
    for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
        record = {"seed": seed, **run_seed(settings, seed, args.models, args.save)}
        per_seed.append(record)
        print(f"seed {seed}: " + "; ".join(f"{arm} P {a['precision']:.3f} R {a['recall']:.3f} (maxprob "
                                           f"{a['maxprob_precision']:.3f} / {a['maxprob_recall']:.3f})"
                                           for arm, a in record["arms"].items()), flush=True)  # fmt: skip
    arms = [arm for arm in ARMS if arm in per_seed[0]["arms"]]
    results = {
        "settings": asdict(settings),
        "machine": f"{platform.machine()} torch {torch.__version__}, {torch.get_num_threads()} thread(s), shared CPU",
        "per_seed": per_seed,
        "arms": {arm: {m: stat([r["arms"][arm][m] for r in per_seed]) for m in METRICS} for arm in arms},
        "flag_rate_target": stat([r["flag_rate_target"] for r in per_seed]),
        "threshold": stat([r["threshold"] for r in per_seed]),
        "verdict_probe_auroc": {k: stat([r["verdict_probe_auroc"][k] for r in per_seed])
                                for k in ("question_position", "answer_position")},  # fmt: skip
        "seconds": time.perf_counter() - started,
    }
    foreign = load.foreign(load_before, load.sample())
    results["load"] = {"other_processes_share_of_machine": foreign, "loadavg_1_5_15": list(os.getloadavg())}
    markdown = format_markdown(results)
    write_results(args.out, results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
