"""The problems of the multi-hop task (eval/multihop_language.py): names joined by one relation in disjoint cycles,
a k-hop question about one of them, and their encoding in the chat format.

A problem's format (`ProblemFormat`): how many cycles of how many names, which sentence templates state the facts
("mixed": one of three per fact, both word orders; "fixed": "{a}'s {r} is {b}." only), what separates the facts (a
space or a new line), and how the reply is asked for (see `encode`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


NAMES = (
    "Anna", "Ben", "David", "Frank", "Henry", "Jack", "Mark", "Sam", "Victor", "Alice", "Martin", "Peter", "Simon",
    "Tom", "Paul", "John", "James", "Mary", "Sarah", "Emily", "Adam", "Daniel", "Michael", "Robert", "Thomas",
    "George", "Charles", "Maria", "Chris", "Andrew", "Joseph", "Anne", "Jane", "Carl", "Fred", "Max", "Luke", "Jacob",
    "Rose", "Alex", "Nick", "Matt", "Dan", "Bill", "Bob", "Jim", "Tim", "Ray", "Ann", "Kim", "Greg", "Jeff", "Scott",
    "Neil",
)  # fmt: skip
RELATIONS = ("mentor", "boss", "neighbor", "coach", "teacher", "doctor", "landlord", "partner")
TEMPLATES = ("{a}'s {r} is {b}.", "The {r} of {a} is {b}.", "{b} is {a}'s {r}.")
TEMPLATE_SETS = {"mixed": TEMPLATES, "fixed": TEMPLATES[:1]}
SEPARATORS = {"space": " ", "line": "\n"}
SYSTEM = "Answer with one name only."
CYCLES, CYCLE_LENGTH = 2, 5
FORMS = ("chain", "composed")
REPLIES = ("bare", "prefilled", "stem")


@dataclass(frozen=True)
class ProblemFormat:
    cycles: int = CYCLES
    cycle_length: int = CYCLE_LENGTH
    template: str = "mixed"
    separator: str = "space"
    reply: str = "bare"

    def __post_init__(self):
        for name, value, allowed in (("template", self.template, tuple(TEMPLATE_SETS)),
                                     ("separator", self.separator, tuple(SEPARATORS)),
                                     ("reply", self.reply, REPLIES)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is invalid: allowed values are {allowed}")
        if self.cycles < 1 or self.cycle_length < 2 or self.cycles * self.cycle_length > len(NAMES):
            raise ValueError(f"cycles={self.cycles!r}, cycle_length={self.cycle_length!r} are invalid: allowed "
                             f"values are cycles >= 1, cycle_length >= 2, cycles * cycle_length <= {len(NAMES)}")

    @property
    def chance(self) -> float:
        return 1 / (self.cycles * self.cycle_length - 1)


def make_problem(rng: random.Random, hops: int, form: str = "chain", cycles: int = CYCLES,
                 cycle_length: int = CYCLE_LENGTH, template: str = "mixed",
                 separator: str = "space") -> dict:  # fmt: skip
    """One problem: chat messages, the answer, the candidate names (all but the asked one), the asked path."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is invalid: allowed values are {FORMS}")
    if not 1 <= hops < cycle_length:
        raise ValueError(f"hops={hops!r} is invalid: allowed values are 1..{cycle_length - 1}")
    ProblemFormat(cycles, cycle_length, template, separator)  # checks the fields
    names = rng.sample(NAMES, cycles * cycle_length)
    relation = rng.choice(RELATIONS)
    successor = {}
    for c in range(cycles):
        cycle = names[c * cycle_length : (c + 1) * cycle_length]
        successor.update({a: cycle[(i + 1) % cycle_length] for i, a in enumerate(cycle)})
    facts = [rng.choice(TEMPLATE_SETS[template]).format(a=a, r=relation, b=b) for a, b in successor.items()]
    asked = rng.choice(names)
    answer = asked
    for _ in range(hops):
        answer = successor[answer]
    path = f"{asked}" + f"'s {relation}" * hops
    if form == "composed":
        facts.append(f"{path} is {answer}.")
    rng.shuffle(facts)
    question = f"Who is {path}?"
    sep = SEPARATORS[separator]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sep.join(facts) + sep + question},
        ],
        "answer": answer,
        "candidates": [n for n in names if n != asked],
        "hops": hops,
        "form": form,
        "path": path,
    }


def problems(seed: int, hops: tuple, n_per_k: int, form: str = "chain", cycles: int = CYCLES,
             cycle_length: int = CYCLE_LENGTH, template: str = "mixed", separator: str = "space") -> list[dict]:
    rng = random.Random(seed)
    draw = [(k, i) for k in hops for i in range(n_per_k)]
    return [make_problem(rng, k, form, cycles, cycle_length, template, separator) for k, _ in draw]


def reply_prefix(problem: dict, reply: str) -> str:
    """What the assistant's reply starts with before the answer: nothing (`bare`), "So <path> is" (`prefilled`) or the
    question turned into the answer's stem, "<path> is" (`stem`)."""
    if reply not in REPLIES:
        raise ValueError(f"reply={reply!r} is invalid: allowed values are {REPLIES}")
    return {"bare": "", "prefilled": f"So {problem['path']} is", "stem": f"{problem['path']} is"}[reply]


def name_token(tokenizer, name: str, lead: str) -> int:
    (only,) = tokenizer(lead + name, add_special_tokens=False).input_ids  # NAMES are one token each, both ways
    return only


def encode(problems: list[dict], tokenizer, reply: str = "bare") -> dict[str, torch.Tensor]:
    """Right-padded prompt ids (B, T), the position of each prompt's last token, the answer's token id and the
    candidates' token ids (B, 9). Causal attention: the padding after a prompt changes nothing before it.
    With a prefix (`reply_prefix`), the name comes as the model writes it mid-sentence (with a leading space) instead
    of as the first token of the reply. The chat prompt and the prefix are tokenized apart, as a chat turn is."""
    prefixes = [reply_prefix(p, reply) for p in problems]
    prompts = [
        tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False) for p in problems
    ]
    ids = [
        tokenizer(text, add_special_tokens=False).input_ids
        + (tokenizer(prefix, add_special_tokens=False).input_ids if prefix else [])
        for text, prefix in zip(prompts, prefixes)
    ]
    lead = " " if reply != "bare" else ""
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in ids]),
        "position": torch.tensor([len(row) - 1 for row in ids]),
        "answer": torch.tensor([name_token(tokenizer, p["answer"], lead) for p in problems]),
        "candidates": torch.tensor([[name_token(tokenizer, n, lead) for n in p["candidates"]] for p in problems]),
    }
