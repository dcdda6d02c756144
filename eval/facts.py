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
(`modeling_ctm.memory.contextual`: subject x relation keys, delta-rule write, logit-bias read). `episodic`,
`token_memory`, `hebbian` and `learn_from` need a model with thinking layers and a carried state (`ctm_carry="chunk"`);
the converted SmolLM2 has none, so they are listed as not run with that reason.

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

from modeling_ctm.io_ctm import atomic_write  # noqa: E402
from modeling_ctm.memory.contextual import (  # noqa: E402
    ContextualConfig,
    ContextualLogitsProcessor,
    ContextualMemory,
)


SMOLLM2_CACHE = "/work/cache/smollm2-ctm"  # a converted copy, when there is one; else the GGUF is converted
ARMS = ("off", "oracle", "rag", "episodic", "token_memory", "hebbian", "learn_from", "contextual")
RUN_ARMS = ("off", "oracle", "rag", "contextual")
NOT_RUN = {
    arm: "needs thinking layers with a carried state (ctm_carry='chunk'); the converted SmolLM2 has neither"
    for arm in ("episodic", "token_memory", "hebbian", "learn_from")
}
METRICS = ("efficacy", "paraphrase", "neighbourhood", "other_relation", "overwrite", "retention_10", "retention_100",
           "retention_1000", "false_recall", "ce_drift", "ms_per_token", "bytes")  # fmt: skip

EXTRA_METRICS = ("exact_match", "write_ms_per_token")

SUBJECTS = """Tom James David Peter Mark Paul Daniel Robert Michael John Chris Frank George Henry Simon Victor Adam Ben
Carl Edward Fred Luke Sam Matt Nick Neil Phil Ross Scott Martin Richard Andrew Anthony Kenneth Jason Gregory Patrick
Jeff Arthur Roger Stephen Larry Jerry Dennis Harold Eugene Howard Ralph Louis Philip Albert""".split()
# relation: (value pool, write templates, query templates as (question, answer stem)); every template names the
# relation's noun, as CounterFact's paraphrases name the relation
RELATIONS = {
    "sister": (
        "Anna Maria Emma Sarah Laura Julia Clara Alice Rose Kate Lucy Helen Grace Linda Susan Mary Jane Amy Eva Lisa",
        [
            "I'm {s}. My sister is called {v}.",
            "{s} here. My sister's name is {v}.",
            "{s}'s sister is called {v}.",
            "{s} has a sister named {v}.",
            "The sister of {s} goes by {v}.",
        ],
        [
            ("What is the name of {s}'s sister?", "The name of {s}'s sister is"),
            ("{s}'s sister, what is she called?", "Her name is"),
            ("Do you remember who {s}'s sister is?", "{s}'s sister is"),
        ],
    ),
    "dog": (
        "Rex Max Buddy Charlie Rocky Bella Duke Bailey Jack Toby Lucky Milo Rusty Sam Bear Shadow Ace Ziggy",
        [
            "I'm {s}. My dog is called {v}.",
            "{s} here. My dog's name is {v}.",
            "{s}'s dog is called {v}.",
            "{s} has a dog named {v}.",
            "The dog that {s} owns answers to {v}.",
        ],
        [
            ("What is the name of {s}'s dog?", "The name of {s}'s dog is"),
            ("{s}'s dog, what is it called?", "Its name is"),
            ("Do you remember {s}'s dog?", "{s}'s dog is"),
        ],
    ),
    "flat": (
        "Paris London Berlin Madrid Rome Vienna Dublin Prague Oslo Tokyo Boston Chicago Athens Lisbon Sydney Cairo",
        [
            "I'm {s}. My flat is in {v}.",
            "{s} here. I rent a flat in {v}.",
            "{s}'s flat is in {v}.",
            "{s} has a flat in {v}.",
            "The flat where {s} lives is in {v}.",
        ],
        [
            ("Which city is {s}'s flat in?", "That flat is in"),
            ("{s}'s flat, where is it?", "{s}'s flat is located in"),
            ("Where does {s} have a flat?", "The flat of {s} is in"),
        ],
    ),
    "job": (
        "teacher doctor nurse lawyer pilot chef farmer baker engineer dentist driver writer singer artist",
        [
            "I'm {s}. My job is {v}.",
            "{s} here. I have a job as a {v}.",
            "{s}'s job is {v}.",
            "{s} has a job as a {v}.",
            "The job {s} does: {v}.",
        ],
        [
            ("What is {s}'s job?", "The job of {s} is"),
            ("{s}'s job, what is it?", "{s} works in the job of"),
            ("Which job does {s} have?", "{s} works as a"),
        ],
    ),
    "meeting": (
        "January February March April May June July August September October November December",
        [
            "I'm {s}. My meeting is in {v}.",
            "{s} here. I have a meeting in {v}.",
            "{s}'s meeting is in {v}.",
            "{s} has a meeting in {v}.",
            "The meeting {s} has is set for {v}.",
        ],
        [
            ("When is {s}'s meeting?", "The meeting of {s} is in"),
            ("{s}'s meeting, which month is it?", "{s}'s meeting is in the month of"),
            ("In which month does {s} have a meeting?", "It is in"),
        ],
    ),
    "colour": (
        "red blue green yellow purple orange black white brown grey gold silver",
        [
            "I'm {s}. My favourite colour is {v}.",
            "{s} here. The colour I like best is {v}.",
            "{s}'s favourite colour is {v}.",
            "{s} likes the colour {v}.",
            "The colour {s} loves most is {v}.",
        ],
        [
            ("What is {s}'s favourite colour?", "The colour {s} likes most is"),
            ("{s}'s favourite colour, which is it?", "The favourite colour of {s} is"),
            ("Which colour does {s} like best?", "{s}'s best-loved colour is"),
        ],
    ),
}
DISTRACTORS = [
    "Can you give me a recipe for pancakes?", "What is the capital of Italy?", "How do I fix a flat bicycle tyre?",
    "Tell me a fact about the moon.", "What should I pack for a weekend trip?", "How many legs does a spider have?",
    "Write one sentence about the sea.", "What is a good name for a blog about plants?",
]  # fmt: skip
ORACLE_REPLY = "Got it, I'll remember that."


@dataclass
class Settings:
    base: str = "smollm2"
    seeds: int = 3
    subjects_told: int = 8
    relations_told: int = 3
    subjects_untold: int = 4
    overwrites: int = 4
    distractors: int = 8
    retention_facts: int = 100
    ce_tokens: int = 512
    layer: int = 4
    quick: bool = False


# ----------------------------------------------------------------------------------------------------------------------
# Facts
# ----------------------------------------------------------------------------------------------------------------------


def one_token(tokenizer, word: str) -> bool:
    return len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1


def pools(tokenizer) -> tuple[list[str], dict[str, list[str]]]:
    """Subjects and value pools kept to words that are one token after a space (a value is one answer token)."""
    # a subject opens some messages (no space before it): it must be one token both ways, or its key differs
    subjects = [
        s for s in SUBJECTS if one_token(tokenizer, s) and len(tokenizer(s, add_special_tokens=False).input_ids) == 1
    ]
    values = {r: [v for v in spec[0].split() if one_token(tokenizer, v)] for r, spec in RELATIONS.items()}
    for relation, pool in values.items():
        if len(pool) < 10:
            raise ValueError(f"relation {relation!r} keeps {len(pool)} one-token values in this tokenizer; 10 needed")
    return subjects, values


def draw(settings: Settings, seed: int, subjects: list[str], values: dict[str, list[str]]) -> dict:
    rng = random.Random(seed)
    people = rng.sample(subjects, settings.subjects_told + settings.subjects_untold)
    told_people, untold = people[: settings.subjects_told], people[settings.subjects_told :]
    facts, unasked = [], []
    for s in told_people:
        relations = rng.sample(list(RELATIONS), settings.relations_told)
        facts += [
            {"subject": s, "relation": r, "value": rng.choice(values[r]), "template": rng.randrange(5)}
            for r in relations
        ]
        unasked += [(s, r) for r in RELATIONS if r not in relations]
    rng.shuffle(facts)
    overwritten = []
    for fact in rng.sample(facts, min(settings.overwrites, len(facts))):
        new = rng.choice([v for v in values[fact["relation"]] if v != fact["value"]])
        overwritten.append({**fact, "old": fact["value"], "value": new, "template": rng.randrange(5)})
    return {"facts": facts, "overwritten": overwritten, "untold": untold, "unasked": unasked,
            "distractors": rng.sample(DISTRACTORS, min(settings.distractors, len(DISTRACTORS)))}  # fmt: skip


def candidates(rng: random.Random, pool: list[str], first: list[str], k: int = 10) -> list[str]:
    chosen = list(dict.fromkeys(first))[:k]
    rest = [v for v in pool if v not in chosen]
    rng.shuffle(rest)
    return chosen + rest[: k - len(chosen)]


def sentence(fact: dict) -> str:
    return RELATIONS[fact["relation"]][1][fact["template"]].format(s=fact["subject"], v=fact["value"])


def efficacy_stem(fact: dict) -> tuple[str, str]:
    """The write template up to the value, as a question and as the answer's stem."""
    template = RELATIONS[fact["relation"]][1][fact["template"]]
    stem = template.split("{v}")[0].format(s=fact["subject"]).rstrip()
    return stem + " ...?", stem


# ----------------------------------------------------------------------------------------------------------------------
# The model in the chat format
# ----------------------------------------------------------------------------------------------------------------------


class Chat:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def ids(self, messages: list[dict], stem: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chat prompt (+ the answer stem) as 1-D ids, and a mask of the text read: the last user message and the
        stem (not the chat template's scaffolding). The pieces are tokenized apart, as a chat turn is."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=stem is not None, tokenize=False)
        content = messages[-1]["content"]
        at = text.rindex(content)
        pieces = [(text[:at], False), (content, True), (text[at + len(content) :], False)]
        if stem is not None:
            pieces.append((stem, True))
        ids, read = [], []
        for piece, is_text in pieces:
            tokens = self.tokenizer(piece, add_special_tokens=False).input_ids
            ids += tokens
            read += [is_text] * len(tokens)
        return torch.tensor(ids), torch.tensor(read)

    def told(self, fact: dict) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        """A fact told as a user message: ids, the subject's last token, the value's token, the message's mask."""
        ids, read = self.ids([{"role": "user", "content": sentence(fact)}])
        value_id = self.tokenizer(" " + fact["value"], add_special_tokens=False).input_ids[0]
        subject_ids = {self.tokenizer(p + fact["subject"], add_special_tokens=False).input_ids[-1] for p in (" ", "")}
        positions = ids.tolist()
        value = max(i for i, t in enumerate(positions) if t == value_id and read[i])
        subject = min(i for i, t in enumerate(positions) if read[i] and t in subject_ids)
        return ids, subject, value, read


# ----------------------------------------------------------------------------------------------------------------------
# Arms
# ----------------------------------------------------------------------------------------------------------------------


class Arm:
    """What an arm does: hear a told conversation, save and load itself, and answer a query."""

    name = "off"

    def __init__(self, chat: Chat):
        self.chat = chat
        self.write_seconds = 0.0
        self.written_tokens = 0

    def hear_fact(self, fact: dict) -> None:
        pass

    def hear_other(self, text: str) -> None:
        pass

    def reload(self, folder: Path) -> None:
        pass

    def context(self, query: dict) -> list[dict]:
        return []

    def bias(self, ids: torch.Tensor, states, read: torch.Tensor) -> torch.Tensor | None:
        return None

    def nbytes(self) -> int:
        return 0

    def processors(self, read: torch.Tensor) -> list:
        return []

    @torch.no_grad()
    def generate(self, query: dict, max_new_tokens: int = 4) -> bool:
        """Greedy answer after the stem: is its first word the true value?"""
        messages = self.context(query) + [{"role": "user", "content": query["question"]}]
        ids, read = self.chat.ids(messages, stem=query["stem"])
        from transformers import LogitsProcessorList

        out = self.chat.model.generate(
            ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=max_new_tokens, do_sample=False,
            logits_processor=LogitsProcessorList(self.processors(read)),
            pad_token_id=self.chat.tokenizer.pad_token_id,
        )  # fmt: skip
        words = self.chat.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).split()
        return bool(words) and words[0].strip(".,!?;:") == query["answer"]

    @torch.no_grad()
    def score(self, query: dict) -> tuple[list[float], int]:
        messages = self.context(query) + [{"role": "user", "content": query["question"]}]
        ids, read = self.chat.ids(messages, stem=query["stem"])
        out = self.chat.model(ids[None], output_hidden_states=isinstance(self, ContextualArm))
        logits = out.logits[0, -1].float()
        bias = self.bias(ids, out.hidden_states if isinstance(self, ContextualArm) else None, read)
        if bias is not None:
            logits = logits + bias
        log_probs = torch.log_softmax(logits, -1)
        token = [self.chat.tokenizer(" " + c, add_special_tokens=False).input_ids[0] for c in query["candidates"]]
        return log_probs[token].tolist(), int(read.sum())


class OracleArm(Arm):
    name = "oracle"

    def __init__(self, chat):
        super().__init__(chat)
        self.told: dict[tuple[str, str], dict] = {}

    def hear_fact(self, fact):
        self.told[(fact["subject"], fact["relation"])] = fact  # the latest telling of a fact is the true one

    def context(self, query):
        fact = self.told.get((query["subject"], query["relation"]))
        if fact is None:
            return []
        return [{"role": "user", "content": sentence(fact)}, {"role": "assistant", "content": ORACLE_REPLY}]

    def nbytes(self):
        return sum(len(sentence(f).encode()) for f in self.told.values())


class RagArm(Arm):
    name = "rag"

    def __init__(self, chat):
        super().__init__(chat)
        self.texts: list[str] = []
        self.keys = torch.zeros(0, chat.model.config.hidden_size)
        table = chat.model.get_input_embeddings().weight.detach().float()
        self.table, self.mean = table, table.mean(0)

    def key(self, text: str) -> torch.Tensor:
        ids = torch.tensor(self.chat.tokenizer(text, add_special_tokens=False).input_ids)
        return F.normalize((self.table[ids] - self.mean).mean(0), dim=-1)

    def hear_fact(self, fact):
        self.hear_other(sentence(fact))

    def hear_other(self, text):
        start = time.perf_counter()
        self.texts.append(text)
        self.keys = torch.cat([self.keys, self.key(text)[None]])
        self.write_seconds += time.perf_counter() - start
        self.written_tokens += len(self.chat.tokenizer(text, add_special_tokens=False).input_ids)

    def reload(self, folder):
        from safetensors.torch import load_file, save_file

        save_file({"keys": self.keys.contiguous()}, str(folder / "rag.safetensors"))
        (folder / "rag.json").write_text(json.dumps(self.texts))
        self.keys = load_file(str(folder / "rag.safetensors"))["keys"]
        self.texts = json.loads((folder / "rag.json").read_text())

    def context(self, query):
        if not self.texts:
            return []
        best = int((self.keys @ self.key(query["question"])).argmax())
        return [{"role": "user", "content": self.texts[best]}, {"role": "assistant", "content": ORACLE_REPLY}]

    def nbytes(self):
        return sum(len(t.encode()) for t in self.texts) + self.keys.numel() * 4


class ContextualArm(Arm):
    name = "contextual"

    def __init__(self, chat, memory: ContextualMemory):
        super().__init__(chat)
        self.memory = memory

    def hear_fact(self, fact):
        start = time.perf_counter()
        ids, subject, value, read = self.chat.told(fact)
        self.memory.write(self.chat.model, self.chat.tokenizer, ids, subject, value, text=read)
        self.write_seconds += time.perf_counter() - start
        self.written_tokens += int(read.sum())

    def reload(self, folder):
        self.memory.save(folder / "contextual")
        self.memory = ContextualMemory.load(folder / "contextual", self.chat.model)

    def bias(self, ids, states, read):
        value = self.memory.read(self.chat.tokenizer, ids, states[self.memory.config.layer][0], read)
        return self.memory.bias_from_value(value[-1])

    def nbytes(self):
        return self.memory.nbytes()

    def processors(self, read):
        return [ContextualLogitsProcessor(self.memory, self.chat.model, self.chat.tokenizer, read)]


# ----------------------------------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------------------------------


def queries_for(world: dict, values: dict, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed + 1)
    final = {(f["subject"], f["relation"]): f for f in world["facts"]}
    changed = {(f["subject"], f["relation"]): f for f in world["overwritten"]}
    told_values = {r: sorted({f["value"] for f in world["facts"] if f["relation"] == r}) for r in RELATIONS}
    out = {"efficacy": [], "paraphrase": [], "overwrite": [], "neighbourhood": [], "other_relation": []}

    def query(kind, subject, relation, question, stem, answer, first, **extra):
        pool = values[relation]
        out[kind].append({"subject": subject, "relation": relation, "question": question, "stem": stem,
                          "answer": answer, "candidates": candidates(rng, pool, first), **extra})  # fmt: skip

    for key, fact in final.items():
        if key in changed:
            continue
        question, stem = efficacy_stem(fact)
        query("efficacy", *key, question, stem, fact["value"], [fact["value"]])
        for q, s in RELATIONS[fact["relation"]][2]:
            query("paraphrase", *key, q.format(s=fact["subject"]), s.format(s=fact["subject"]), fact["value"],
                  [fact["value"]], order=world["facts"].index(fact))  # fmt: skip
    for key, fact in changed.items():
        for q, s in RELATIONS[fact["relation"]][2]:
            query("overwrite", *key, q.format(s=fact["subject"]), s.format(s=fact["subject"]), fact["value"],
                  [fact["value"], fact["old"]])  # fmt: skip
    for subject in world["untold"]:
        for relation, (_, _, templates) in RELATIONS.items():
            q, s = templates[rng.randrange(len(templates))]
            told = told_values[relation][:]
            rng.shuffle(told)
            query("neighbourhood", subject, relation, q.format(s=subject), s.format(s=subject), None, told[:5],
                  told=told_values[relation])  # fmt: skip
    for subject, relation in world["unasked"]:
        q, s = RELATIONS[relation][2][rng.randrange(3)]
        query("other_relation", subject, relation, q.format(s=subject), s.format(s=subject), None, [])
    return out


def run_queries(arm: Arm, queries: list[dict]) -> tuple[list[list[float]], float, int]:
    scores, tokens = [], 0
    start = time.perf_counter()
    for q in queries:
        s, n = arm.score(q)
        scores.append(s)
        tokens += n
    return scores, time.perf_counter() - start, tokens


def top(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


def build_arm(name: str, chat: Chat, calibration: torch.Tensor, layer: int) -> Arm:
    if name == "off":
        return Arm(chat)
    if name == "oracle":
        return OracleArm(chat)
    if name == "rag":
        return RagArm(chat)
    memory = ContextualMemory.for_model(chat.model, calibration, ContextualConfig(layer=layer))
    return ContextualArm(chat, memory)


@torch.no_grad()
def held_out_ce(chat: Chat, arm: Arm, ids: torch.Tensor) -> float:
    out = chat.model(ids[None], output_hidden_states=True)
    logits = out.logits[0, :-1].float()
    if isinstance(arm, ContextualArm):
        logits = (
            logits + arm.memory.logit_bias(chat.tokenizer, ids, out.hidden_states[arm.memory.config.layer][0])[:-1]
        )
    return float(F.cross_entropy(logits, ids[1:]))


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
            "off", "contextual") else None  # fmt: skip
        metrics["ms_per_token"] = 1000 * seconds / max(tokens, 1)
        metrics["write_ms_per_token"] = 1000 * arm.write_seconds / arm.written_tokens if arm.written_tokens else None
        metrics["bytes"] = arm.nbytes()
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
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first_seed .. first_seed+seeds-1 (fresh seeds check settings chosen on others)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} is invalid: allowed values are integers >= 1")
    settings = Settings(base=args.base, seeds=args.seeds, quick=args.quick)
    if args.quick:
        settings = Settings(base=args.base, seeds=args.seeds, quick=True, subjects_told=3, relations_told=2,
                            subjects_untold=2, overwrites=2, distractors=2, retention_facts=10, ce_tokens=64)  # fmt: skip
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
