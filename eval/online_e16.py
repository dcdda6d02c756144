"""E16, phase 4 online learning: ten facts told in one conversation, N other conversations, then a new conversation
(empty context) asks for each fact. Which part of the memory stack remembers, and what does it cost?

The protocol is MemoryLLM's knowledge retention test (inject, N distractor contexts, query) scored like ROME/MEMIT
(efficacy, paraphrase, neighbourhood), run through `CTMOnlineSession`, the
phase-4 session users get (`say`/`end` over `generate`, the brain between conversations).

Facts (`fact_form`, see FORMS): "NAME CODE." by default (multi-query associative recall: asked "NAME", the answer
follows its key), or "The code of NAME is CODE." (`sentence`). NAME is one of 60 invented names (one token each), CODE one of `n_codes` = 10
common nouns; a fact set is `facts` = 10 names with a random one-to-one assignment of codes, drawn per trial. Training
rows assign codes at random too, so no name has a code the model could know: only what it was told can explain a hit.
Chance is 1/10 for every recall metric but `exact`.

Model (`online_base.py`; trained in this script, once and shared by the seeds as in E7, or per seed with `--set
shared_model=false`; `--set base_dir=DIR` keeps it and reuses it while the settings it depends on agree), in two
stages as the main job's phases: (1) the reader, a plain decoder (2 layers, d=128, `ctm_token_shift="embedding"`)
trained on `reading_rows`, multi-query recall in the session's own tokens ("NAME WORD." told, then asked; the loss on
the asked words, `reading_loss_on`), so that it reads a fact from its context: the oracle's skill, the experiment's
positive control; (2) a CTM
block added beside the last layer's MLP (`start_thinking(ctm_mlp="keep")`: the reader's function exactly at the start)
and trained alone (`base_freeze`) by `ContinuityTrainer` with the attention cut between 2 chunks on held-in filler text
(a small grammar) and fact documents: "carry" rows tell 10 facts in chunk 1 and ask for them in chunk 2 (only the
carried state can answer), "context" rows tell and ask inside one chunk. `--set reading_steps=0` trains the CTM from
scratch in stage 2 alone (the earlier base; its oracle was at chance). In the sentence form training asks with the
question and its paraphrase half each; in the pair form the paraphrase ("So NAME") is never trained (an unseen
paraphrase, as the anchor protocol asks). Phase 4's session rule is kept: everything but the thinking blocks is frozen
(what sleep and `learn_from` may change); the Hebbian arm's rule (`plasticity`, PlasticityConfig fields) is the delta
rule into the model's fast-weight token memory by default (`token_memory="token"`: `ctm_token_memory` added empty to
the trained base, so every arm computes what the base did until something is written).

Per trial: conversation 1 tells the 10 facts, one user message each (the model replies `reply_tokens` tokens). Then N
distractor conversations of held-out filler text (`distractor_turns` messages each) follow, N = 0, 4, 16, 64
measured along one life. At each N every fact is asked with `CTMOnlineSession.score` (a new conversation: recall by
the question, then the log-probability of each code; the brain is not changed by asking):

    off         the session with no memory stack (the same checkpoint: what it knew without being told)
    episodic    episodic memory only: recall of a stored thinking state by the question
    hebbian     Hebbian plasticity only: an edit at the end of every conversation
    learn_from  the gradient mode only: one anchored SGD step per user message
    all         episodic + Hebbian + learn_from + sleep every `sleep_every` conversations (phase 4's stack)
    placebo     `all`, but conversation 1 tells the same names with other codes (a derangement): the recall of the
                true codes must fall to chance or below if the stack stores what it was told
    rag         no stack; the user messages of the stored conversation whose key (the episodic memory's own,
                `key_function`) best matches the question are put in front of it (retrieval among the distractors)
    oracle      no stack; conversation 1's messages are put in front of the question (the upper bound of reading)

`off`, `rag` and `oracle` change no weights and carry nothing across conversations, so their conversations are not
run (they could not change a score); `rag` retrieves among the texts the other arms lived through.

Metrics (mean over the facts of all trials of a seed; mean ± sd over seeds in the table):

    recall        the true code has the highest log-probability among the 10 codes (efficacy; chance 0.1)
    exact         greedy decoding over the whole vocabulary gives the true code
    answer_logp   log-probability of the true code (nats)
    paraphrase    recall asked with the form's paraphrase ("So NAME" / "So NAME's code is")
    neighbourhood the share of 10 names never told whose top code is the same as before the session (1 = undisturbed)
    ce_cost       held-out CE (20 rows of 128 held-out filler tokens, fresh context) after the session minus before
    recalled      the share of questions that recalled an episode (episodic arms) or retrieved conversation 1 (rag)

Cost: ms per processed token of the conversations with the arm's stack against `off_timed` (the same conversations,
stack off), and the bytes the stack holds at the end (episodes, plasticity anchors and statistics, replay heap,
learn_from's anchor copy).

    python eval/online_e16.py [--seeds 3] [--out eval/results/online_e16] [--quick] [--set FIELD=VALUE ...]
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


torch.set_num_threads(1)  # tiny tensors; a busy shared CPU makes extra threads a loss

from harness import (  # noqa: E402
    experiment_parser,
    summarize_arms,
    write_results,
)
from machine import MachineLoad  # noqa: E402
from online_base import base_model  # noqa: E402  (sibling modules: the base model, the report,
from online_e16_report import draw_retention, format_markdown  # noqa: E402
from online_facts import (  # noqa: E402  (the language: names, codes, filler text)
    CODES,
    FORMS,
    NAMES,
    Corpus,
    fit_tokenizer,
    paraphrase,
    question,
    statement,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_ctm import CTMForCausalLM  # noqa: E402
from modeling_ctm.memory.episodic import KEY_FUNCTIONS, SIZED_KEY_FUNCTIONS, CTMEpisodicMemory  # noqa: E402
from modeling_ctm.memory.plasticity import HebbianPlasticity, PlasticityConfig, memory_held_bytes  # noqa: E402
from modeling_ctm.memory.session import CTMOnlineSession, OnlineConfig  # noqa: E402
from modeling_ctm.memory.sleep import ConsolidationConfig, Consolidator, ReplayHeap  # noqa: E402
from modeling_ctm.training.phases import freeze_for_thinking  # noqa: E402


ARMS = {
    "off": "no memory stack (the control)",
    "episodic": "episodic memory only",
    "hebbian": "Hebbian plasticity only",
    "learn_from": "gradient learn_from only",
    "all": "episodic + Hebbian + learn_from + sleep",
    "placebo": "all, told other codes for the same names",
    "rag": "no stack; best-matching stored messages in the prompt",
    "oracle": "no stack; the facts in the prompt (upper bound)",
}
LIVED = ("episodic", "hebbian", "learn_from", "all", "placebo")  # arms whose conversations can change a score
METRICS = ("recall", "exact", "answer_logp", "paraphrase", "neighbourhood", "ce_cost", "recalled")
@dataclass
class Settings:
    seeds: int = 3
    # model (CTMConfig fields) and tokenizer
    vocab_size: int = 640
    hidden_size: int = 128  # d=64 did not form the lookup in 2,000 steps (4 runs); d=128 did (oracle 1.0)
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    ctm_ticks: int = 3
    ctm_memory_length: int = 4
    ctm_n_synch_out: int = 64
    ctm_n_synch_action: int = 32
    ctm_nlm_hidden_size: int = 8
    ctm_synapse_depth: int = 4
    ctm_chunk_size: int = 16
    ctm_token_shift: str = "embedding"  # each position also sees its previous token: the lookup forms
    ctm_mlp: str = "keep"  # the block beside the reader's MLP (exact start; the delta rule's "mlp" target)
    # training, stage 1 (the reader): a plain decoder learns to read a fact from its context (the oracle's skill)
    reading_steps: int = 2000  # 0: no reader stage, the CTM trained from scratch in stage 2 alone (the old base)
    reading_batch: int = 64
    reading_lr: float = 2e-3  # with the loss on the answers (1e-3 and every token a target: oracle 0.83 on 9 fact sets)
    reading_share: float = 1.0  # of the reader's rows: facts told and asked (the rest filler text)
    reading_loss_on: str = "answers"  # the reader's loss on the asked words only, or on every token ("all")
    # training, stage 2: the CTM block added (start_thinking) and trained with the carry
    base_freeze: str = "non_ctm"  # what stage 2 trains when a reader was trained first: the block alone
    chunk_length: int = 80  # two chunks per training row; a fact set (70 tokens) fits in one
    train_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    carry_share: float = 0.25
    context_share: float = 0.7
    fact_form: str = "pair"  # a key of FORMS
    shared_model: bool = True  # one model for all seeds (seeds vary the facts, the distractors and the arms' draws)
    base_dir: str | None = None  # keep the trained base here and reuse it when the settings it was trained with agree
    # protocol
    facts: int = 10
    trials: int = 3
    distractors: list[int] = field(default_factory=lambda: [0, 4, 16, 64])
    distractor_turns: int = 2
    distractor_words: int = 30
    reply_tokens: int = 2
    neighbours: int = 10
    ce_paragraphs: int = 20
    # the memory stack (phase 4's tiny preset unless stated)
    recall_threshold: float = 0.0  # a pair question is one word: recall the best episode (retrieval is scored)
    memory_capacity: int = 64
    key_function: str = "token_set"  # the episodic memory's key, which rag retrieves by too (KEY_FUNCTIONS)
    key_size: int = 1024  # token_set's size: less crosstalk between texts than the hidden size
    token_memory: str = "token"  # the base's fast-weight memory (ctm_token_memory), added empty after training
    # PlasticityConfig fields of the Hebbian arm: the delta rule into the token memory, keyed by the token before the
    # value, a step of 8 per unit of prediction error averaged per slot (`running_mean`), no surprise gate (within a
    # 3-token message the code is less surprising than the name before it), each slot bounded at 20 x the head's
    # RMS row norm (4 and 5: recall 0.7-1.0 per fact set, the bound binding); the MLP delta rule is
    # {"rule": "delta", "targets": ["mlp"], "presynaptic": "centered"}
    plasticity: dict = field(
        default_factory=lambda: dict(rule="delta", targets=["token_memory"], learning_rate=8.0, gate="none",
                                     delta_step="running_mean", max_step=20.0, max_drift=20.0)
    )  # fmt: skip
    learn_rate: float = 0.05
    learn_anchor: float = 1.0
    sleep_every: int = 4
    sleep_capacity: int = 16
    sleep_steps: int = 1
    sleep_lr: float = 1e-4

    def validate(self) -> None:
        if not 1 <= self.facts <= len(CODES):
            raise ValueError(f"facts={self.facts} is invalid: allowed values are 1..{len(CODES)} (one code per fact)")
        if self.fact_form not in FORMS:
            raise ValueError(f"fact_form={self.fact_form!r} is invalid: allowed values are {sorted(FORMS)}")
        if self.facts + self.neighbours > len(NAMES):
            raise ValueError(
                f"neighbours={self.neighbours} is invalid: facts + neighbours must be at most {len(NAMES)} names"
            )
        if sorted(set(self.distractors)) != list(self.distractors) or self.distractors[0] < 0:
            raise ValueError(f"distractors={self.distractors} is invalid: allowed values are increasing integers >= 0")
        if self.chunk_length % self.ctm_chunk_size:
            raise ValueError(f"chunk_length={self.chunk_length} is invalid: a multiple of ctm_chunk_size")
        if self.token_memory not in ("none", "token"):
            raise ValueError(f"token_memory={self.token_memory!r} is invalid: allowed values are 'none', 'token'")
        if self.reading_loss_on not in ("all", "answers"):
            raise ValueError(f"reading_loss_on={self.reading_loss_on!r} is invalid: allowed values are 'all', 'answers'")
        if not 0 <= self.reading_share <= 1:
            raise ValueError(f"reading_share={self.reading_share} is invalid: allowed values are numbers in [0, 1]")
        if self.reading_steps < 0:
            raise ValueError(f"reading_steps={self.reading_steps} is invalid: allowed values are integers >= 0")
        if self.carry_share + self.context_share > 1 or min(self.carry_share, self.context_share) < 0:
            raise ValueError("carry_share and context_share are invalid: two shares >= 0 summing to at most 1")
        if self.key_function not in KEY_FUNCTIONS:
            raise ValueError(f"key_function={self.key_function!r} is invalid: allowed values are {sorted(KEY_FUNCTIONS)}")
        PlasticityConfig(**self.plasticity)  # raises naming the field
        for name in ("trials", "train_steps", "batch_size", "reply_tokens", "ce_paragraphs", "sleep_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed values are integers >= 1")


# the settings the base model depends on (base_dir reuses a base only when they agree)
QUICK = dict(train_steps=4, batch_size=4, reading_steps=4, reading_batch=4, trials=1, facts=3, distractors=[0, 2], neighbours=3, ce_paragraphs=2,
             sleep_every=2)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Sessions and the questions
# ----------------------------------------------------------------------------------------------------------------------


def key_options(settings: Settings) -> dict:
    sized = settings.key_function in SIZED_KEY_FUNCTIONS
    return {"key_function": settings.key_function, **({"key_size": settings.key_size} if sized else {})}


def make_session(arm: str, base: CTMForCausalLM, tokenizer, settings: Settings) -> CTMOnlineSession:
    """A fresh brain on a copy of the trained model, with the arm's part of the memory stack."""
    model = copy.deepcopy(base)
    freeze_for_thinking(model, "non_ctm")  # phase 4's rule: sleep and learn_from change the thinking blocks only
    stack = {"episodic", "hebbian", "learn_from"} if arm in ("all", "placebo") else {arm}
    memory = (
        CTMEpisodicMemory.for_model(model.config, capacity=settings.memory_capacity, **key_options(settings))
        if "episodic" in stack
        else None
    )
    plasticity = HebbianPlasticity(model, PlasticityConfig(**settings.plasticity)) if "hebbian" in stack else None
    heap = consolidator = None
    if arm in ("all", "placebo"):
        heap = ReplayHeap(capacity=settings.sleep_capacity)
        consolidator = Consolidator(model, ConsolidationConfig(steps=settings.sleep_steps, lr=settings.sleep_lr))
    config = OnlineConfig(
        recall_threshold=settings.recall_threshold,
        sleep_every=settings.sleep_every if heap is not None else None,
        learn_rate=settings.learn_rate if "learn_from" in stack else 0.0,
        learn_anchor=settings.learn_anchor,
        max_new_tokens=settings.reply_tokens,
    )
    return CTMOnlineSession(model, tokenizer, memory, plasticity, heap, consolidator, config)


def converse(session: CTMOnlineSession, messages: list[str]) -> tuple[float, int]:
    """One conversation; returns its wall time and the tokens it processed."""
    started = time.perf_counter()
    for message in messages:
        session.say(message)
    report = session.end()
    return time.perf_counter() - started, report["tokens"]


def ask(session: CTMOnlineSession, question: str, true_code: str, context: list[str] | None = None) -> dict:
    """Score the 10 codes after `question` (with `context` messages in front for rag/oracle)."""
    # the messages in front as separate turns, each encoded alone as the session encodes what it is told (joined into
    # one string, the names after the first would be other tokens, " NAME" for "NAME", than the ones told)
    scored = session.score([*(context or []), question], [f" {c}" for c in CODES])
    log_probs = scored["log_probs"]
    truth = CODES.index(true_code)
    return {
        "top": CODES[int(log_probs.argmax())],
        "recall": float(int(log_probs.argmax()) == truth),
        "exact": float(scored["greedy"][truth]),
        "answer_logp": float(log_probs[truth]),
        "recalled": float(scored["recalled"]),
    }


@torch.no_grad()
def held_out_ce(model: CTMForCausalLM, corpus: Corpus) -> float:
    losses = [float(model(ids, labels=ids).loss) for ids in corpus.cost_ids]
    return sum(losses) / len(losses)


def brain_bytes(session: CTMOnlineSession) -> int:
    total = 0
    if session.memory is not None:
        total += session.memory.bytes_per_episode * len(session.memory)
    if session.plasticity is not None:
        total += memory_held_bytes(session.plasticity)
    if session.heap is not None:
        total += session.heap.memory_bytes()
    if session._anchor is not None:
        total += sum(t.numel() * t.element_size() for t in session._anchor.values())
    return total


def measure(session, form, facts, neighbours, before_top, ce_before, corpus, context_for=None, retrieved_right=None):
    """All metrics of one arm at one N. `context_for(question)` gives rag/oracle their prompt texts."""
    rows, para = [], []

    def asked(text, code):
        return ask(session, text, code, context_for(text) if context_for else None)

    for name, code in facts:
        rows.append(asked(question(form, name), code))
        para.append(asked(paraphrase(form, name), code)["recall"])
    unchanged = [float(asked(question(form, name), CODES[0])["top"] == before_top[name]) for name in neighbours]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    recalled = mean("recalled") if retrieved_right is None else retrieved_right(facts)
    return {
        "recall": mean("recall"),
        "exact": mean("exact"),
        "answer_logp": mean("answer_logp"),
        "paraphrase": sum(para) / len(para),
        "neighbourhood": sum(unchanged) / len(unchanged),
        "ce_cost": held_out_ce(session.model, corpus) - ce_before,
        "recalled": recalled,
    }


def run_trial(base, tokenizer, corpus: Corpus, settings: Settings, rng: random.Random, trial: int, log=print) -> dict:
    """One fact set through every arm. Returns {arm: {N: metrics}} and the cost figures."""
    picked = rng.sample(NAMES, settings.facts + settings.neighbours)
    names, neighbours = picked[: settings.facts], picked[settings.facts :]
    codes = rng.sample(CODES, settings.facts)
    facts = list(zip(names, codes))
    shift = 1 + rng.randrange(settings.facts - 1) if settings.facts > 1 else 0
    placebo_facts = [(name, codes[(i + shift) % settings.facts]) for i, name in enumerate(names)]
    if settings.facts == 1:  # a one-fact derangement: another code than the true one
        placebo_facts = [(names[0], next(c for c in CODES if c != codes[0]))]
    form = settings.fact_form
    told = [statement(form, name, code) for name, code in facts]
    distractors = [corpus.distractor(trial * 1000 + i, settings) for i in range(max(settings.distractors))]

    off = make_session("off", base, tokenizer, settings)
    before_top = {name: ask(off, question(form, name), CODES[0])["top"] for name in neighbours}
    ce_before = held_out_ce(off.model, corpus)
    results, cost = {arm: {} for arm in ARMS}, {}

    # off_timed: the lived arms' conversations with the stack off (the cost baseline; it changes nothing)
    timing = {"off_timed": [0.0, 0]}
    for messages in [told] + distractors:
        seconds, tokens = converse(off, messages)
        timing["off_timed"][0] += seconds
        timing["off_timed"][1] += tokens

    for arm in LIVED:
        session = make_session(arm, base, tokenizer, settings)
        seconds, tokens = converse(
            session, [statement(form, n, c) for n, c in (placebo_facts if arm == "placebo" else facts)]
        )
        lived = 0
        for n in settings.distractors:
            for messages in distractors[lived:n]:
                s, t = converse(session, messages)
                seconds, tokens = seconds + s, tokens + t
            lived = n
            results[arm][n] = measure(session, form, facts, neighbours, before_top, ce_before, corpus)
        timing[arm] = [seconds, tokens]
        cost[arm] = {"bytes_held": brain_bytes(session)}
        log(
            f"  trial {trial} {arm}: recall by N {[round(results[arm][n]['recall'], 2) for n in settings.distractors]}"
        )
    for arm, (seconds, tokens) in timing.items():
        cost.setdefault(arm, {})["ms_per_token"] = 1000 * seconds / max(tokens, 1)

    # the arms without a stack: the trained model asked, with nothing / the retrieved / the true messages in front
    # rag retrieves by the episodic memory's own key, computed from the user messages as the session files them
    index = CTMEpisodicMemory.for_model(off.model.config, capacity=1, **key_options(settings))
    keys = lambda texts: index.key_of(  # noqa: E731
        off.model, torch.cat([off.encode(text, used=0) for text in texts], dim=1), None
    )
    for n in settings.distractors:
        library = [told] + distractors[:n]  # the user messages of every conversation lived so far
        library_keys = torch.cat([keys(texts) for texts in library])

        def retrieve(question, library=library, library_keys=library_keys):
            return library[int((library_keys @ keys([question])[0]).argmax())]

        def right(fact_set, library_keys=library_keys):
            hits = [int((library_keys @ keys([question(form, name)])[0]).argmax()) == 0 for name, _ in fact_set]
            return sum(hits) / len(hits)

        results["off"][n] = measure(off, form, facts, neighbours, before_top, ce_before, corpus)
        results["rag"][n] = measure(off, form, facts, neighbours, before_top, ce_before, corpus, retrieve, right)
        results["oracle"][n] = measure(off, form, facts, neighbours, before_top, ce_before, corpus, lambda q: told)
    return {"results": results, "cost": cost, "facts": facts, "placebo_facts": placebo_facts}


# ----------------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------------


def run(settings: Settings, out_dir: Path | None, log=print) -> dict:
    settings.validate()
    hf_logging.set_verbosity_error()
    load = MachineLoad()
    started, load_before = time.perf_counter(), load.sample()
    tokenizer = fit_tokenizer(settings)
    corpus = Corpus(tokenizer, settings)
    per_seed = []
    trained = {}
    for seed in range(settings.seeds):
        model_seed = 0 if settings.shared_model else seed
        if model_seed not in trained:
            t0 = time.perf_counter()
            trained[model_seed] = base_model(settings, tokenizer, corpus, model_seed)
            last = trained[model_seed][1][-1]["loss"] if trained[model_seed][1] else "-"
            log(f"model {model_seed}: ready in {time.perf_counter() - t0:.0f} s, loss {last}")
        base, train_log = trained[model_seed]
        if settings.token_memory == "token":
            base.add_token_memory()
        rng = random.Random(7_000 + seed)
        trials = [run_trial(base, tokenizer, corpus, settings, rng, t, log) for t in range(settings.trials)]
        record = {"seed": seed, "train_log": train_log, "trials": trials}
        for arm in ARMS:  # the seed's number for an arm: the mean over its trials, at every N and at the largest N
            for n in settings.distractors:
                record[f"{arm}@{n}"] = {
                    metric: sum(t["results"][arm][n][metric] for t in trials) / len(trials) for metric in METRICS
                }
            record[arm] = record[f"{arm}@{settings.distractors[-1]}"]
        cost_arms = trials[0]["cost"].keys()
        record["cost"] = {
            arm: {k: sum(t["cost"][arm][k] for t in trials) / len(trials) for k in trials[0]["cost"][arm]}
            for arm in cost_arms
        }
        per_seed.append(record)

    arms = summarize_arms(per_seed, ARMS, METRICS)
    retention = {
        arm: {
            str(n): summarize_arms(per_seed, {f"{arm}@{n}": ARMS[arm]}, METRICS)[f"{arm}@{n}"]
            for n in settings.distractors
        }
        for arm in ARMS
    }
    cost = {}
    for arm in per_seed[0]["cost"]:
        for key in per_seed[0]["cost"][arm]:
            values = [r["cost"][arm][key] for r in per_seed]
            cost.setdefault(arm, {})[key] = sum(values) / len(values)
    machine = {
        "seconds": round(time.perf_counter() - started, 1),
        "foreign_load": load.foreign(load_before, load.sample()),
    }
    result = {
        "settings": asdict(settings),
        "per_seed": per_seed,
        "arms": arms,
        "retention": retention,
        "cost": cost,
        "machine": machine,
        "chance": 1 / len(CODES),
    }
    if out_dir is not None:
        draw_retention(result, out_dir / "retention.png")
        write_results(out_dir, result, format_markdown(result))
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------



def main(argv=None) -> int:
    parser = experiment_parser(__doc__, default_out="eval/results/online_e16", settings=Settings, quick=QUICK)
    args = parser.parse_args(argv)
    settings = args.settings
    result = run(settings, args.out)
    print(format_markdown(result))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} and {args.out / 'retention.png'}")
    return 0 if all(math.isfinite(result["arms"][arm]["recall_mean"]) for arm in ARMS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
