"""The world of the facts protocol (eval/facts.py): subjects, relations with their value pools and templates,
distractor conversations, the seeded draw of who is told what, and the queries asked of it."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from facts import Settings


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
# Queries
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
