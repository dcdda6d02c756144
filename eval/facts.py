"""Facts told in everyday sentences in one conversation, asked under paraphrase in a later one.

Protocol (in the style of bioS and CounterFact). Each seed draws subjects (first names) and, for each told subject,
`relations_told` of the six relations below, each with a value from the relation's pool (one token after a space in
the model's tokenizer, so a value is one answer token). Every fact is told in its own conversation with one of five
write templates (first person, "I'm Tom. My sister is called Anna.", and third person); the conversation ends. Then
distractor conversations. Then the arm's memory is saved, loaded from disk, and asked in a new session.

A query is a chat question (a held-out template: question form or inverted order) followed by the start of the
assistant's answer (its stem, "Tom's sister is called"); the score of a candidate is the log-probability of its token
there. The true value is ranked among 10 candidates of the same relation (chance 0.10). Metrics (means over queries):

    efficacy        a told fact asked with the stem of the template it was told in
    paraphrase      a told fact asked with the held-out query templates
    neighbourhood   untold subjects: the top candidate is the one the never-told model (`off`) ranks top
    other_relation  told subjects, relations never told about them: top candidate unchanged against `off`
    overwrite       facts told again later with a new value: the new value ranks first (the old one a candidate)
    retention_10    the first 10 facts (paraphrase) after 10 facts told; retention_100 after 100 (as far as the
                    subject pool allows: the number told is in the settings); retention_1000 is not run (null)
    false_recall    untold subjects: the top candidate is a value told to another subject for that relation (half of
                    the candidates are); read it against `off`'s rate, the chance of the candidate set
    ce_drift        held-out Austen CE with the arm's read on minus off (nats); null where the arm adds context
    exact_match     (extra) greedy answer after the stem of the first query template: its first word is the value
    ms_per_token    wall ms per query token (question + stem) to answer, context included; the write's cost per
                    told token is `write_ms_per_token`
    bytes           what the arm holds between sessions

Arms: `off` (no memory); `oracle` (the told fact(s) about the queried subject and relation in an earlier chat turn:
the upper bound of retrieval); `rag` (every past conversation kept as text, keyed by its centred mean input embedding,
the episodic memory's key; the best match to the question put in an earlier turn); `contextual`
(`modeling_ctm.memory.contextual`: subject x relation keys, delta-rule write, logit-bias read, told the subject and
value of each sentence); `contextual_extracted` (the same memory, the subject and value found in the sentence by
`modeling_ctm.memory.statements.find_statements`, as `ctm chat` finds them; its `found` is the share of told sentences
where that found the fact's own subject and value). `episodic`,
`token_memory`, `hebbian` and `learn_from` need a model with thinking layers and a carried state (`ctm_carry="chunk"`);
the converted SmolLM2 has none, so they are listed as not run with that reason.

The world (subjects, relations, templates, the draw and the queries) is in facts_world.py; the chat format and the
arms in facts_arms.py.

    python eval/facts.py --base smollm2 [--seeds 3] [--out docs/results/facts-smollm2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


torch.set_num_threads(1)

import torch.nn.functional as F  # noqa: E402
from facts_arms import Arm, Chat, build_arm, held_out_ce, run_queries, top  # noqa: E402
from facts_world import RELATIONS, candidates, draw, pools, queries_for  # noqa: E402
from harness import experiment_settings, quick_field, quick_values  # noqa: E402

from modeling_ctm.io_ctm import atomic_write  # noqa: E402


SMOLLM2_CACHE = "/work/cache/smollm2-ctm"  # a converted copy, when there is one; else the GGUF is converted
ARMS = ("off", "oracle", "rag", "episodic", "token_memory", "hebbian", "learn_from", "contextual",
        "contextual_extracted")  # fmt: skip
RUN_ARMS = ("off", "oracle", "rag", "contextual", "contextual_extracted")
NOT_RUN = {
    arm: "needs thinking layers with a carried state (ctm_carry='chunk'); the converted SmolLM2 has neither"
    for arm in ("episodic", "token_memory", "hebbian", "learn_from")
}
METRICS = ("efficacy", "paraphrase", "neighbourhood", "other_relation", "overwrite", "retention_10", "retention_100",
           "retention_1000", "false_recall", "ce_drift", "ms_per_token", "bytes")  # fmt: skip

EXTRA_METRICS = ("exact_match", "write_ms_per_token", "found")


@dataclass
class Settings:
    base: str = "smollm2"
    seeds: int = 3
    # the world's sizes and the held-out text: a full run's, then --quick's
    subjects_told: int = quick_field(8, 3)
    relations_told: int = quick_field(3, 2)
    subjects_untold: int = quick_field(4, 2)
    overwrites: int = quick_field(4, 2)
    distractors: int = quick_field(8, 2)
    retention_facts: int = quick_field(100, 10)
    ce_tokens: int = quick_field(512, 64)
    layer: int = 4
    quick: bool = False


# ----------------------------------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------------------------------


def run_seed(settings: Settings, seed: int, chat: Chat, values, subjects, calibration, held_out) -> dict:
    world = draw(settings, seed, subjects, values)
    queries = queries_for(world, values, seed)
    per_arm, off_tops = {}, {}
    for name in RUN_ARMS:
        torch.manual_seed(seed)
        arm = build_arm(name, chat, calibration, settings.layer)
        facts = world["facts"]
        for fact in facts:
            arm.hear_fact(fact)
        for text in world["distractors"]:
            arm.hear_other(text)
        for fact in world["overwritten"]:
            arm.hear_fact(fact)
        with tempfile.TemporaryDirectory() as folder:
            arm.reload(Path(folder))  # the queries come in a new session, from what was saved
        metrics, seconds, tokens = {}, 0.0, 0
        tops = {}
        for kind, items in queries.items():
            scores, spent, n = run_queries(arm, items)
            seconds, tokens = seconds + spent, tokens + n
            tops[kind] = [top(s) for s in scores]
        if name == "off":
            off_tops = tops
        for kind in ("efficacy", "paraphrase", "overwrite"):
            metrics[kind] = statistics.fmean(t == 0 for t in tops[kind]) if tops[kind] else None
        asked = [q for q in queries["paraphrase"] if q["question"] == RELATIONS[q["relation"]][2][0][0].format(
            s=q["subject"])]  # fmt: skip
        metrics["exact_match"] = statistics.fmean(arm.generate(q) for q in asked) if asked else None
        metrics["neighbourhood"] = statistics.fmean(
            a == b for a, b in zip(tops["neighbourhood"], off_tops["neighbourhood"])
        )
        metrics["other_relation"] = statistics.fmean(
            a == b for a, b in zip(tops["other_relation"], off_tops["other_relation"])
        ) if tops["other_relation"] else None  # fmt: skip
        metrics["false_recall"] = statistics.fmean(
            q["candidates"][t] in q["told"] for q, t in zip(queries["neighbourhood"], tops["neighbourhood"])
        )
        metrics["ce_drift"] = held_out_ce(chat, arm, held_out) - held_out_ce(chat, Arm(chat), held_out) if name in (
            "off", "contextual", "contextual_extracted") else None  # fmt: skip
        metrics["ms_per_token"] = 1000 * seconds / max(tokens, 1)
        metrics["write_ms_per_token"] = 1000 * arm.write_seconds / arm.written_tokens if arm.written_tokens else None
        metrics["bytes"] = arm.nbytes()
        # contextual_extracted: the told sentences whose subject and value the chat's extractor found
        metrics["found"] = arm.found / arm.heard if getattr(arm, "heard", 0) else None
        metrics.update(retention(settings, seed, chat, name, values, subjects, calibration))
        per_arm[name] = metrics
        print(f"seed {seed} {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if v is not None),
              flush=True)  # fmt: skip
    return {"seed": seed, "facts": len(world["facts"]), "queries": {k: len(v) for k, v in queries.items()},
            "arms": per_arm}  # fmt: skip


def retention(settings, seed, chat, name, values, subjects, calibration) -> dict:
    """The first 10 facts, asked with the paraphrase templates, after 10 and after `retention_facts` facts."""
    out = {"retention_10": None, "retention_100": None, "retention_1000": None}
    if name == "off":
        return out
    rng = random.Random(seed + 7)
    grid = [(s, r) for s in subjects for r in RELATIONS]
    rng.shuffle(grid)
    facts = [{"subject": s, "relation": r, "value": rng.choice(values[r]), "template": rng.randrange(5)}
             for s, r in grid[: settings.retention_facts]]  # fmt: skip
    first = facts[:10]
    asked = []
    for fact in first:
        q, s = RELATIONS[fact["relation"]][2][rng.randrange(3)]
        asked.append({"subject": fact["subject"], "relation": fact["relation"], "question": q.format(s=fact["subject"]),
                      "stem": s.format(s=fact["subject"]), "candidates": candidates(rng, values[fact["relation"]],
                      [fact["value"]])})  # fmt: skip
    arm = build_arm(name, chat, calibration, settings.layer)
    for count, fact in enumerate(facts, 1):
        arm.hear_fact(fact)
        if count in (10, 100, 1000) and count <= len(facts):
            scores, _, _ = run_queries(arm, asked)
            out[f"retention_{count}"] = statistics.fmean(top(s) == 0 for s in scores)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Key geometry: is the subject key the same subject across templates, and another subject's far?
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def key_geometry(chat: Chat, subjects: list[str], values, calibration, layers=(2, 4, 8, 12)) -> dict:
    rng = random.Random(0)
    people = subjects[:10]
    relations = list(RELATIONS)[:3]
    rows = []  # (subject index, relation index, {layer: raw key})
    for i, s in enumerate(people):
        for j, r in enumerate(relations):
            fact = {"subject": s, "relation": r, "value": rng.choice(values[r]), "template": 2 + j % 3}
            ids, subject, _, _ = chat.told(fact)
            states = chat.model(ids[None], output_hidden_states=True).hidden_states
            rows.append((i, j, {layer: states[layer][0, subject].float() for layer in layers}))
    calib_states = chat.model(calibration[None], output_hidden_states=True).hidden_states
    out = {}
    for layer in layers:
        raw = torch.stack([row[2][layer] for row in rows])
        subject_of = torch.tensor([row[0] for row in rows])
        for centring, mean in (("raw", torch.zeros_like(raw[0])), ("text_mean", calib_states[layer][0].float().mean(0)),
                               ("key_mean", raw.mean(0))):  # fmt: skip
            keys = F.normalize(raw - mean, dim=-1)
            cos = keys @ keys.T
            same = subject_of[:, None] == subject_of[None]
            eye = torch.eye(len(rows), dtype=torch.bool)
            masked = cos.masked_fill(eye, -2)
            top1 = (subject_of[masked.argmax(1)] == subject_of).float().mean()
            out[f"layer{layer}_{centring}"] = {
                "same_subject_cos": float(cos[same & ~eye].mean()),
                "other_subject_cos": float(cos[~same].mean()),
                "top1": float(top1),
            }
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def load_base(base: str, model_path: str | None):
    from transformers import AutoTokenizer

    from modeling_ctm import CTMForCausalLM

    if base == "tiny":
        if model_path is None:
            raise SystemExit(
                "--base tiny needs --model-path (a phase checkpoint of the tiny preset with a chat template); none is "
                "built by this script"
            )
        path = model_path
        model = CTMForCausalLM.from_pretrained(path)
    elif model_path or Path(SMOLLM2_CACHE, "config.json").exists():
        path = model_path or SMOLLM2_CACHE
        model = CTMForCausalLM.from_pretrained(path)
    else:
        from modeling_ctm.hub.sources import resolve_source

        folder, gguf = resolve_source("smollm2-135m-instruct")
        model = CTMForCausalLM.from_llama(folder, gguf_file=gguf)
        path = folder
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        return model.eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise SystemExit(f"the tokenizer at {path} has no chat template: the protocol asks in the chat format")
    return model.eval(), tokenizer


def summarise(runs: list[dict]) -> dict:
    arms = {}
    for name in ARMS:
        if name in NOT_RUN:
            arms[name] = {"not_run": NOT_RUN[name]}
            continue
        entry = {}
        for metric in METRICS + EXTRA_METRICS:
            numbers = [r["arms"][name][metric] for r in runs if r["arms"][name].get(metric) is not None]
            if numbers:
                entry[metric] = {"mean": statistics.fmean(numbers),
                                 "sd": statistics.stdev(numbers) if len(numbers) > 1 else 0.0}  # fmt: skip
            else:
                entry[metric] = None
        arms[name] = entry
    return arms


def table(results: dict) -> str:
    arms = results["arms"]
    shown = list(METRICS + EXTRA_METRICS)
    lines = ["| arm | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, entry in arms.items():
        if "not_run" in entry:
            lines.append(f"| {name} | " + " | ".join("not run" for _ in shown) + " |")
            continue
        cells = []
        for metric in shown:
            value = entry.get(metric)
            if value is None:
                cells.append("-")
            elif metric == "bytes":
                cells.append(f"{value['mean']:.0f}")
            else:
                cells.append(f"{value['mean']:.3f} +- {value['sd']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(args, settings, geometry, runs, seconds) -> dict:
    results = {"settings": {**asdict(settings), "first_seed": args.first_seed, "seeds_done": len(runs)}, "key_geometry": geometry, "seeds": runs,
               "arms": summarise(runs), "wall_seconds": seconds, "chance": 0.1}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2)))
    geometry_lines = ["| layer, centring | same subject cos | other subject cos | top-1 |", "|---|---|---|---|"]
    geometry_lines += [f"| {k} | {v['same_subject_cos']:.3f} | {v['other_subject_cos']:.3f} | {v['top1']:.2f} |"
                       for k, v in geometry.items()]  # fmt: skip
    markdown = (
        f"# Facts in sentences, recalled under paraphrase ({args.base}, {len(runs)} seeds)\n\n"
        f"Settings: {json.dumps(asdict(settings))}. Chance 0.10. Mean +- sd over seeds. Wall {seconds:.0f} s."
        "\n\n" + table(results) + "\n\n## Subject key geometry\n\n" + "\n".join(geometry_lines) + "\n"
    )
    atomic_write(out / "results.md", lambda p: Path(p).write_text(markdown))
    print(markdown, flush=True)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="eval/results/facts")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first_seed .. first_seed+seeds-1 (fresh seeds check settings chosen on others)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} is invalid: allowed values are integers >= 1")
    settings = experiment_settings(args, Settings, {**quick_values(Settings), "quick": True}, base=args.base)
    model, tokenizer = load_base(args.base, args.model_path)
    chat = Chat(model, tokenizer)
    subjects, values = pools(tokenizer)
    from modeling_ctm.training.data import austen_splits

    splits = austen_splits()
    text = "\n".join(splits["validation"]["text"][:200])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    calibration = torch.tensor(tokenizer("\n".join(splits["train"]["text"][:200]), add_special_tokens=False)
                               .input_ids[:256])  # fmt: skip
    held_out = ids[: settings.ce_tokens]
    start = time.time()
    geometry = key_geometry(chat, subjects, values, calibration, layers=(2, 4) if args.quick else (2, 4, 8, 12))
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        runs.append(run_seed(settings, seed, chat, values, subjects, calibration, held_out))
        # written after every seed: a run stopped early keeps the seeds it finished (the settings say how many)
        results = write_results(args, settings, geometry, runs, time.time() - start)
    return results


if __name__ == "__main__":
    main()
