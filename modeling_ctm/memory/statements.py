# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Finding the facts a chat message states, so `ctm chat` can write them into the contextual memory by itself.

The contextual memory (`memory/contextual.py`) writes a fact given the position of its subject and of its value. In
the facts protocol someone tells it both; in a chat nobody does. `find_statements` reads a user message and returns,
for every declarative fact in it, the sentence to write and the spans of its subject and value in that sentence; for
questions, requests, negations, hedges and chit-chat it returns nothing.

It is a small pattern set over the everyday forms people state facts in (English only):

    my / our / the / his / her / their / Tom's  NOUN [NOUN..] ['s name] is|was|'s [called|named|on|in|at|a ...] VALUE
        "my sister is called Anna", "my sister's name is Anna", "the meeting is on Tuesday", "Tom's dog is Rex"
    the name of  my|our|Tom's  NOUN  is VALUE                 -> "my NOUN is called VALUE"
    I / we / Tom  live|work|study|... [in|at|as|for ...] VALUE  "I live in Paris", "Tom works as a teacher"
    I|we have a NOUN called|named VALUE                        -> "my|our NOUN is called VALUE"
    Tom has a NOUN called|named VALUE                          -> "Tom's NOUN is called VALUE"
    I|Tom have|has a NOUN in|at|as (a) VALUE                   -> "my|Tom's NOUN is in|at|as VALUE"
    VALUE is my|our NOUN                                       -> "my|our NOUN is VALUE"

The **subject** is the owner word ("my", "our", "the", "I", "Tom"), the **value** the first word after the copula and
its particles. The memory keys the subject by its hidden state and the relation by the content words between subject
and value ("sister", "meeting", "live"), so this split is the one the memory needs: "my sister is called Anna" and "my
dog is called Rex" share the subject and the surface "is called", and differ in the relation. A sentence is written in
a canonical form: discourse openers are dropped ("actually", "no,", "by the way"), so "actually my sister is called
Beth" has the same relation key as "my sister is called Anna" and overwrites it; inverted and "have a" forms are
rewritten as "my NOUN is VALUE"; and the owner word is lower-cased, as it is inside a question ("what is my sister
called?"), so the written subject is the token a later question has there.

Refused on purpose: a sentence that ends in "?" or opens with a question word, auxiliary or request ("what", "do",
"is", "tell me", "remind me"); a clause with a negation or a hedge ("not", "n't", "never", "maybe", "if", "I think");
a subject that is a pronoun ("she lives in Rome": no coreference here); a fact with no relation word, which the
memory's relation key could not tell from any other ("my name is Sam", "I'm from Spain": "name", "from" are function
words to it). Cost: a few regular expressions per message, no model call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .contextual import STOPWORDS


@dataclass(frozen=True)
class Statement:
    """One fact a message states. `text` is the sentence to write; `subject` and `value` are (start, end) character
    spans in it; `source` is the (start, end) span in the message of the clause it was read from."""

    text: str
    subject: tuple[int, int]
    value: tuple[int, int]
    source: tuple[int, int]

    @property
    def subject_text(self) -> str:
        return self.text[self.subject[0] : self.subject[1]]

    @property
    def value_text(self) -> str:
        return self.text[self.value[0] : self.value[1]]

    def written(self) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """(text, subject, value) to give `CTMOnlineSession.tell_fact`: the text behind one space, so that its first
        word is the token it is inside a sentence. A message opens with "my" (or "I", "Tom"), a later question has
        " my" there, another token with another embedding, and the subject key is read from that token's state."""
        return " " + self.text, (self.subject[0] + 1, self.subject[1] + 1), (self.value[0] + 1, self.value[1] + 1)


# words a clause may open with that make it a question or a request, not a statement
QUESTION_OPENERS = frozenset(
    """what what's whats who who's whom whose where where's when when's which why how how's do does did don't doesn't
    didn't is isn't are aren't was wasn't were can can't could would will won't should shall may might must have has
    had tell remind guess say recall name list give show""".split()
)
# a clause holding one of these is not a plain statement of fact
NEGATIONS_AND_HEDGES = re.compile(
    r"\b(not|never|no longer|nobody|nothing|maybe|perhaps|probably|might|if|whether|unless|suppose|imagine|"
    r"pretend|wish|hope|think|guess|believe|wonder|used to)\b|n't\b",
    re.IGNORECASE,
)
# discourse openers dropped before matching, so a correction has the same relation words as the fact it corrects
OPENER = re.compile(
    r"^(?:(?:actually|oh|ah|well|so|also|and|but|btw|by the way|just so you know|fyi|for the record|no|nope|yes|yeah|"
    r"sorry|okay|ok|hey|hi|hello|now|anyway|correction|update|wait|remember|note|please note|please remember|"
    r"to be clear|in fact|i should say|i should mention|let me tell you|you should know|i want you to know|"
    r"just to let you know|to let you know)\b[\s,:;.!-]*(?:that\s+)?)+",
    re.IGNORECASE,
)
OWNERS = "my|our|the|his|her|their"
NAME = r"[A-Z][a-z]+"
NOUN = r"[a-z][a-z-]*"
# particles between the copula and the value; the value is the first word after them
PARTICLES = r"(?:(?:called|named|on|in|at|from|a|an|the|for|by|to|near|as)\s+)*"
VALUE = r"[A-Za-z0-9][\w'-]*(?:\s+[A-Z][\w'-]*)*"
VERBS = (
    r"live|lives|lived|work|works|worked|study|studies|studied|teach|teaches|stay|stays|drive|drives|play|plays|"
    r"grew up|was born|were born|moved|moved to"
)
# a value that is a function word or an adverb means the pattern caught a sentence that is no simple fact
NOT_VALUES = frozenset(
    """a an the my our your his her their its this that these those it he she they we you i me him them us very really
    so too quite pretty also still just always often going coming getting being doing here there now then today
    tomorrow yesterday and or but""".split()
)
PRONOUN_SUBJECTS = frozenset("it he she they this that there here what who which you".split())

POSSESSED = re.compile(
    rf"^(?P<owner>(?i:{OWNERS})|(?P<name>{NAME})'s)\s+(?P<noun>{NOUN}(?:\s+{NOUN}){{0,3}}?)"
    rf"(?P<named>'s\s+name|\s+name)?(?:\s+(?:is|was)|'s)\s+{PARTICLES}(?P<value>{VALUE})"
)
NAME_OF = re.compile(
    rf"^the\s+name\s+of\s+(?P<owner>(?i:my|our)|(?P<name>{NAME})'s)\s+(?P<noun>{NOUN}(?:\s+{NOUN})?)\s+(?:is|was)\s+"
    rf"(?P<value>{VALUE})",
    re.IGNORECASE,
)
DOES = re.compile(rf"^(?P<owner>I|we|We|{NAME})\s+(?P<verb>{VERBS})\s+{PARTICLES}(?P<value>{VALUE})")
HAVE = re.compile(
    rf"^(?:(?P<owner>I|we|We)\s+(?:have|'ve got|have got|own)|(?P<name>{NAME})\s+(?:has|owns))\s+(?:a|an)\s+"
    rf"(?P<noun>{NOUN}(?:\s+{NOUN})?)\s+(?:called|named)\s+(?P<value>{VALUE})"
)
HAVE_IN = re.compile(
    rf"^(?:(?P<owner>I|we|We)\s+(?:have|own)|(?P<name>{NAME})\s+(?:has|owns))\s+(?:a|an)\s+(?P<noun>{NOUN})\s+"
    rf"(?P<prep>in|at|on|near|as an|as a|as)\s+(?P<value>{VALUE})"
)
# a clause that says who is speaking: "I'm Tom", "Tom here", "my name is Tom"
SPEAKER = re.compile(rf"^(?:(?:I'm|I am|this is|my name is|My name is)\s+(?P<name>{NAME})|(?P<here>{NAME})\s+here)$")
INVERTED = re.compile(
    rf"^(?P<value>{NAME}(?:\s+{NAME})*)\s+is\s+(?P<owner>(?i:my|our))\s+(?P<noun>{NOUN}(?:\s+{NOUN})?)\s*$"
)

SENTENCE = re.compile(r"[^.!?;\n]+[.!?;]*")
CLAUSE_BREAK = re.compile(r",\s*(?:and|but)?\s*|\s+(?:and|but)\s+(?=(?:my|our|the|I|we|[A-Z][a-z]+'s)\b)")


def _owner_word(owner: str) -> str:
    """The owner as it stands inside a question: "My" -> "my", a name or "I" as it is."""
    return owner.lower() if owner.lower() in OWNERS.split("|") + ["we"] else owner


def _build(pieces: list[tuple[str, str | None]], source: tuple[int, int]) -> Statement:
    """Join `pieces` (text, role) with single spaces (none before "'s"); the spans of the pieces whose role is
    "subject" and "value"."""
    text, spans = "", {}
    for piece, role in pieces:
        if text and not piece.startswith("'"):
            text += " "
        if role is not None:
            spans[role] = (len(text), len(text) + len(piece))
        text += piece
    return Statement(text, spans["subject"], spans["value"], source)


def _value(match: re.Match) -> str | None:
    value = match.group("value").strip()
    if value.lower() in NOT_VALUES:
        return None
    return value


def _read_clause(clause: str, source: tuple[int, int]) -> Statement | None:
    for pattern in (NAME_OF, HAVE, HAVE_IN, INVERTED, POSSESSED, DOES):
        match = pattern.match(clause)
        if match is None:
            continue
        value = _value(match)
        if value is None:
            return None
        owner = match.group("owner") or ""
        if pattern is DOES:
            if owner.lower() in PRONOUN_SUBJECTS:
                return None
            # the clause as said, the owner word as a question has it ("I live in Paris")
            subject = "I" if owner == "I" else _owner_word(owner)
            middle = clause[match.end("owner") : match.start("value")].split()
            return _build([(subject, "subject"), *((w, None) for w in middle), (value, "value")], source)
        name = match.groupdict().get("name")
        noun = " ".join(match.group("noun").split())
        if pattern in (HAVE, HAVE_IN) and not name:
            owner = "my" if owner == "I" else "our"
        if name:
            subject_pieces = [(name, "subject"), ("'s " + noun, None)]
        else:
            subject_pieces = [(_owner_word(owner), "subject"), (noun, None)]
        if pattern in (NAME_OF, HAVE):
            return _build([*subject_pieces, ("is called", None), (value, "value")], source)
        if pattern is HAVE_IN:
            return _build([*subject_pieces, ("is " + match.group("prep"), None), (value, "value")], source)
        if pattern is INVERTED:
            return _build([*subject_pieces, ("is", None), (value, "value")], source)
        # POSSESSED: the sentence as said, the owner lower-cased (a name kept), the openers already dropped
        if name:
            return Statement(clause[: match.end("value")], (0, len(name)), match.span("value"), source)
        subject = _owner_word(owner)
        shift = len(subject) - match.end("owner")
        text = subject + clause[match.end("owner") : match.end("value")]
        return Statement(text, (0, len(subject)), (match.start("value") + shift, match.end("value") + shift), source)
    return None


def _has_relation(statement: Statement) -> bool:
    """Whether a content word stands between subject and value: the memory's relation key is made of them, and a fact
    without one ("my name is Sam") would have a key that matches nothing."""
    between = statement.text[statement.subject[1] : statement.value[0]].lower()
    return any(word not in STOPWORDS for word in re.findall(r"[a-z]+", between))


def _as_speaker(statement: Statement, speaker: str) -> Statement | None:
    """A first-person statement about a speaker who gave their name, said of the name: "my sister is called Anna" ->
    "Tom's sister is called Anna", "I live in Paris" -> "Tom lives in Paris" (a later question may ask either way)."""
    owner = statement.subject_text
    if owner == "my":
        text, head = f"{speaker}'s" + statement.text[2:], len(speaker) + 2 - 2
    elif owner == "I":
        words = statement.text[2:].split(" ", 1)
        verb = words[0] + ("es" if words[0].endswith(("ch", "sh")) else "s")
        text = f"{speaker} {verb} {words[1]}" if len(words) > 1 else f"{speaker} {verb}"
        head = len(text) - len(statement.text)
    else:
        return None
    value = (statement.value[0] + head, statement.value[1] + head)
    return Statement(text, (0, len(speaker)), value, statement.source)


def find_statements(message: str) -> list[Statement]:
    """The facts `message` states, in order (see the module docstring); [] for questions and chit-chat. When the
    message says who is speaking ("I'm Tom.", "Tom here."), each first-person fact is also returned said of that name,
    right after it."""
    if not isinstance(message, str):
        raise ValueError(f"message={message!r} is invalid: allowed values are strings")
    found, speaker = [], None
    for sentence in SENTENCE.finditer(message):
        body = sentence.group().strip()
        if not body or body.endswith("?"):
            continue
        at = sentence.start() + sentence.group().index(body)
        clauses, start = [], 0
        for brk in CLAUSE_BREAK.finditer(body):
            clauses.append((body[start : brk.start()], at + start))
            start = brk.end()
        clauses.append((body[start:], at + start))
        for clause, offset in clauses:
            stripped = clause.strip().rstrip(".!;")
            lead = OPENER.match(stripped)
            if lead:
                stripped = stripped[lead.end() :]
            words = stripped.split()
            if not words:
                continue
            if words[0].lower() in QUESTION_OPENERS:
                break  # a question or a request: the rest of its sentence is part of it
            if NEGATIONS_AND_HEDGES.search(stripped):
                continue
            introduced = SPEAKER.match(stripped)
            if introduced:
                speaker = introduced.group("name") or introduced.group("here")
                continue
            source = (offset + clause.index(stripped), offset + clause.index(stripped) + len(stripped))
            statement = _read_clause(stripped, source)
            if statement is not None and _has_relation(statement):
                found.append(statement)
                named = _as_speaker(statement, speaker) if speaker else None
                if named is not None:
                    found.append(named)
    return found


# ordinary chat-like text whose hidden-state mean is the subject keys' first centre, when `ctm chat` builds a fact
# memory for a model (no dataset is read at chat time)
CALIBRATION_TEXT = (
    "Hello, how are you today? I am fine, thank you. The weather was nice this morning, so we went for a walk in the "
    "park near the river. My friend told me about a new book she is reading, a story about a family that moves to a "
    "small town by the sea. What do you think about it? Could you help me plan a trip for next month? We would like "
    "to visit two cities, see a museum and eat at a good restaurant. The train leaves early on Monday and comes back "
    "on Friday evening. Please remind me to buy tickets and to call the hotel. Our neighbours have a garden with "
    "apple trees, and their children play football after school. I work at an office in the centre, and my brother "
    "studies history at the university. Tell me something interesting about the moon, or a simple recipe for soup."
)


def default_fact_layer(model) -> int:
    """The decoder layer whose state keys a fact's subject in a chat: 1. A chat fact's subject is an owner word ("my",
    "I", "the") more often than a name, and its state drifts with the words around it as layers go up. Measured on
    SmolLM2-135M-Instruct (a statement's owner word against the same word in three paraphrased questions, centred):
    "my" 0.99 at layer 1, 0.84-0.87 at 2, 0.69-0.72 at 4; "I" 0.99 / 0.69 / 0.58; "the" 1.00 / 0.69-0.82 / -0.30; a
    name ("Tom") 0.98-1.00 at all of them; other owners' cosines stay <= 0.18 at layer 1. (The facts protocol keys
    names, at layer 4.)"""
    return min(1, model.config.num_hidden_layers)


# the logit bias of a full match in a chat (the protocol's memory uses 20): a chat reply is free text, and the model's
# own opening ("I'm sorry, ...", "The ...") has to be outbid at its first token. Measured on SmolLM2: at 20, "Which city
# do I live in?" (relation cosine 0.85 to "live") put " Oslo" 1.2 nats under the top opening token
CHAT_STRENGTH = 30.0


def chat_fact_memory(model, tokenizer, layer: int | None = None):
    """An empty `ContextualMemory` for `model`, its subject centre calibrated on `CALIBRATION_TEXT`, keyed at
    `default_fact_layer` unless `layer` is given, with the chat's `CHAT_STRENGTH`."""
    import torch

    from .contextual import ContextualConfig, ContextualMemory

    layer = default_fact_layer(model) if layer is None else layer
    ids = torch.tensor(tokenizer(CALIBRATION_TEXT, add_special_tokens=False).input_ids)
    ids = ids[: model.config.max_position_embeddings].to(model.device)
    return ContextualMemory.for_model(model, ids, ContextualConfig(layer=layer, strength=CHAT_STRENGTH))
