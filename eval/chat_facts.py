"""`ctm chat`'s fact memory end to end: facts stated in everyday sentences in one conversation come back when asked in
other words, each question in a new conversation of the brain loaded from disk.

Per seed: four facts (my sister's name, my dog's name, the city I live in, the day of the meeting), each value drawn
from a pool of ten (seven days), each stated with one of several everyday phrasings, all in one conversation, as a
user would type them into `ctm chat --brain DIR`. The brain is saved. Then every fact is asked with two questions in
other words than it was told ("What's my sister's name?", "Where do I live?"), each question in its own conversation
of the brain loaded from disk (what a new `ctm chat --brain DIR` process does). Greedy replies.

Arms:

    told         the chat's fact memory: `memory.statements.find_statements` finds subject and value in each message,
                 `CTMOnlineSession.tell_fact` writes them, the memory is saved with the brain, its read steers
                 the reply
    never_told   the same questions to a brain never told anything (the control: does the model guess the value?)
    in_context   the statement of the asked fact as the conversation's previous turn, then the question, fact memory
                 off (the positive control: can the base model use the fact when it is in front of it?)

Metrics (means over the seed's questions): `recall` (the value is a word of the reply), `clean` (the value is, and no
other value of its pool: "Thursday, Wednesday, Friday" is recall without clean), `found` (the stated facts the
extractor found with the right value; `told` only), `ms_per_token` (generation wall ms per generated token: the read
runs one forward of the conversation per generated token), `bytes` (the fact memory held).

    python eval/chat_facts.py --base smollm2 --seeds 3 --out docs/results/chat-facts-smollm2
    python eval/chat_facts.py --base tiny --checkpoint runs/tiny/phase4-online/model --seeds 3 --out DIR
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


torch.set_num_threads(1)

from harness import (  # noqa: E402
    arms_table,
    experiment_parser,
    experiment_result,
    run_seeds,
    summarize_arms,
    write_results,
)

from modeling_ctm.cli import open_chat_session, remember_statements  # noqa: E402
from modeling_ctm.memory.session import CTMOnlineSession  # noqa: E402
from modeling_ctm.memory.statements import chat_fact_memory  # noqa: E402


SMOLLM2 = "/work/cache/smollm2-ctm"
ARMS = {
    "told": "the chat's fact memory (facts found in the messages, written, saved, loaded, read)",
    "never_told": "control: the same questions to a brain never told anything",
    "in_context": "positive control: the statement in the previous turn of the question's conversation",
}
METRICS = ("recall", "clean", "found", "ms_per_token", "bytes")
# relation: (values, how it is stated, how it is asked); the questions use other words than the statements
FACTS = {
    "sister": (
        "Anna Maria Emma Sarah Laura Julia Clara Alice Rose Kate".split(),
        ["My sister is called {v}.", "My sister's name is {v}.", "I have a sister named {v}.", "{v} is my sister."],
        ["What's my sister's name?", "What is my sister called?"],
    ),
    "dog": (
        "Rex Max Buddy Charlie Rocky Bella Duke Toby Milo Bear".split(),
        ["My dog is called {v}.", "My dog's name is {v}.", "I have a dog called {v}.",
         "By the way, my dog is called {v}."],  # fmt: skip
        ["What is my dog called?", "What's my dog's name?"],
    ),
    "city": (
        "Paris London Berlin Madrid Rome Vienna Dublin Prague Oslo Lisbon".split(),
        ["I live in {v}.", "I live in {v} with my family.", "Just so you know, I live in {v}.",
         "Actually, I live in {v}."],
        ["Which city do I live in?", "Where do I live?"],
    ),
    "meeting": (
        "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
        ["The meeting is on {v}.", "The meeting is on {v} at 10am.", "Remember, the meeting is on {v}.",
         "FYI the meeting is on {v}."],  # fmt: skip
        ["When is the meeting?", "What day is the meeting?"],
    ),
}


@dataclass
class Settings:
    base: str = "smollm2"
    checkpoint: str = SMOLLM2
    preset: str = "tiny"
    seeds: int = 3
    max_new_tokens: int = 16
    questions_per_fact: int = 2


def draw(seed: int) -> list[dict]:
    rng = random.Random(seed)
    facts = []
    for relation, (values, statements, questions) in FACTS.items():
        value = rng.choice(values)
        facts.append({"relation": relation, "value": value, "statement": rng.choice(statements).format(v=value),
                      "questions": questions})  # fmt: skip
    return facts


def quiet(call, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return call(*args, **kwargs)


def ask(session: CTMOnlineSession, question: str, max_new_tokens: int) -> tuple[str, float, int]:
    start = time.perf_counter()
    reply = session.say(question, max_new_tokens=max_new_tokens)
    return reply, time.perf_counter() - start, len(session.reply_ids)


def holds(reply: str, value: str) -> bool:
    return re.search(rf"\b{re.escape(value)}\b", reply) is not None


def clean(reply: str, value: str, relation: str) -> bool:
    return holds(reply, value) and not any(holds(reply, other) for other in FACTS[relation][0] if other != value)


def run_seed(settings: Settings, seed: int) -> dict:
    checkpoint = Path(settings.checkpoint)
    facts = draw(seed)
    asked = [(f, q) for f in facts for q in f["questions"][: settings.questions_per_fact]]
    out, replies = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        brain = Path(scratch) / "brain"
        session = quiet(open_chat_session, checkpoint, None, settings.preset)
        session.contextual = chat_fact_memory(session.model, session.tokenizer)
        found = 0
        for fact in facts:  # one conversation, as a user types the facts into one `ctm chat` run
            statements = quiet(remember_statements, session, fact["statement"])
            found += any(s.value_text == fact["value"] for s in statements)
            session.say(fact["statement"], read_facts=not statements, max_new_tokens=settings.max_new_tokens)
        session.end()
        session.save(brain)
        nbytes = session.contextual.nbytes()
        for arm in ARMS:
            hits, cleans, seconds, tokens, replies[arm] = 0, 0, 0.0, 0, []
            for fact, question in asked:
                if arm == "told":
                    session = CTMOnlineSession.load(brain)  # a new process: the brain from disk
                else:
                    session = quiet(open_chat_session, checkpoint, None, settings.preset)
                if arm == "in_context":
                    session.say(fact["statement"], max_new_tokens=settings.max_new_tokens)
                reply, spent, n = ask(session, question, settings.max_new_tokens)
                hits += holds(reply, fact["value"])
                cleans += clean(reply, fact["value"], fact["relation"])
                seconds, tokens = seconds + spent, tokens + n
                replies[arm].append({"question": question, "value": fact["value"], "reply": reply})
            out[arm] = {"recall": hits / len(asked), "clean": cleans / len(asked),
                        "ms_per_token": 1000 * seconds / max(tokens, 1),
                        "found": found / len(facts) if arm == "told" else float("nan"),
                        "bytes": nbytes if arm == "told" else 0}  # fmt: skip
    out["statements"] = [f["statement"] for f in facts]
    out["replies"] = replies
    return out


def main(argv=None):
    parser = experiment_parser(__doc__, default_out="docs/results/chat-facts-smollm2", settings=Settings,
                               quick={"questions_per_fact": 1, "max_new_tokens": 12})  # fmt: skip
    parser.add_argument("--base", choices=["smollm2", "tiny"], default=None, help="which model (tiny: --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="the model folder (default: the converted SmolLM2)")
    args = parser.parse_args(argv)
    settings = args.settings
    if args.base is not None:
        settings.base = args.base
    if args.checkpoint is not None:
        settings.checkpoint = args.checkpoint
    if settings.base == "tiny" and settings.checkpoint == SMOLLM2:
        parser.error("--base tiny needs --checkpoint (a phase-4 model folder)")
    if not (Path(settings.checkpoint) / "config.json").is_file():
        parser.error(f"--checkpoint {settings.checkpoint}: not a model folder (no config.json)")
    started = time.perf_counter()
    per_seed = run_seeds(settings.seeds, lambda seed: run_seed(settings, seed))
    arms = summarize_arms(per_seed, ARMS, metrics=METRICS)
    wall = time.perf_counter() - started
    lines = [f"# `ctm chat` fact memory, base {settings.base}", "",
             f"{settings.seeds} seeds, 4 facts each stated once in one conversation, asked by "
             f"{settings.questions_per_fact} paraphrased question(s) each in new conversations of the brain loaded "
             f"from disk; greedy, {settings.max_new_tokens} new tokens; {wall:.0f} s wall.", "",
             arms_table(arms, METRICS), "", "## Replies (seed 0)", ""]  # fmt: skip
    for arm, rows in per_seed[0]["replies"].items():
        lines += [f"- **{arm}**"] + [f"  - {r['question']} ({r['value']}) -> {r['reply']!r}" for r in rows]
    write_results(args.out, experiment_result(settings, per_seed, arms, wall_seconds=wall), markdown="\n".join(lines))


if __name__ == "__main__":
    main()
