"""The language of eval/online_e16.py (E16): invented names, code words, the forms a fact is told and asked in, a
small grammar of filler text, the tokenizer fitted on it, the filler corpus and the training rows. `settings` is
E16's Settings (the fields named where they are read)."""

from __future__ import annotations

import random

import torch
from datasets import Dataset

from modeling_ctm.training.tokenization import train_tokenizer


# Invented one-token names (no prior can explain a hit), ten code words, and a small grammar of filler text for the
# distractor conversations; the tokenizer is fitted on this language so each word is one token.
NAMES = [
    f"{a}{b}"
    for a in ("Ba", "Ce", "Di", "Fo", "Gu", "Ha", "Je", "Ki", "Lo", "Mu")
    for b in ("ran", "vel", "tor", "mis", "dun", "lek")
]
CODES = ["house", "letter", "garden", "father", "sister", "room", "friend", "family", "heart", "walk"]
FILLER = {
    "det": ["the", "a", "every", "no", "that"],
    "adj": ["old", "young", "quiet", "bright", "cold", "small", "kind", "late", "wet", "tall"],
    "noun": ["man", "woman", "child", "river", "road", "bird", "tree", "boat", "town", "hill", "dog", "lamp"],
    "verb": ["saw", "found", "left", "passed", "watched", "followed", "heard", "crossed", "painted", "kept"],
    "prep": ["near", "under", "behind", "beyond", "beside"],
}
# How a fact is told and asked: (question template, paraphrase template, paraphrase used in training). A statement
# is the question followed by " CODE.". "pair" is multi-query associative recall (the answer follows its key, what a
# copying attention head learns first); "sentence" needs a two-token match ("NAME is" -> CODE), which the 2-layer
# model here did not learn in 2,000 steps (the oracle stayed at chance: eval/README.md).
FORMS = {
    "pair": ("{name}", "So {name}", False),
    "sentence": ("The code of {name} is", "So {name}'s code is", True),
}


# ----------------------------------------------------------------------------------------------------------------------
# Text: facts, fillers, distractors
# ----------------------------------------------------------------------------------------------------------------------


def question(form: str, name: str) -> str:
    return FORMS[form][0].format(name=name)


def paraphrase(form: str, name: str) -> str:
    return FORMS[form][1].format(name=name)


def statement(form: str, name: str, code: str) -> str:
    return f"{question(form, name)} {code}."


def fact_ids(tokenizer, text: str, code: str) -> list[int]:
    """A question followed by its code, tokenized on its own, as a session tokenizes each user message."""
    return tokenizer(f"{text} {code}.", add_special_tokens=False).input_ids


def filler_sentence(rng: random.Random) -> str:
    """One sentence of the filler grammar: det adj noun verb det noun [prep det adj noun] ."""
    pick = lambda kind: rng.choice(FILLER[kind])  # noqa: E731
    words = [pick("det"), pick("adj"), pick("noun"), pick("verb"), pick("det"), pick("noun")]
    if rng.random() < 0.5:
        words += [pick("prep"), pick("det"), pick("adj"), pick("noun")]
    return " ".join(words).capitalize() + "."


def fit_tokenizer(settings):
    """A byte-level BPE fitted on the experiment's language (facts over every name and code, filler), large enough
    that every word is one token; checked, since a split name would make recall a different task."""
    rng = random.Random(0)
    texts = [f"{form[i].format(name=name)} {code}." for form in FORMS.values() for i in (0, 1) for name in NAMES
             for code in CODES]  # fmt: skip
    texts += [filler_sentence(rng) for _ in range(3000)]
    tokenizer = train_tokenizer(texts * 2, vocab_size=settings.vocab_size)
    split = [w for w in NAMES + CODES if len(tokenizer(f" {w}", add_special_tokens=False).input_ids) != 1]
    split += [w for w in NAMES if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]  # a message's first word
    if split:
        raise ValueError(f"vocab_size={settings.vocab_size} is too small: {split[:5]} are not single tokens")
    return tokenizer


class Corpus:
    """The filler text the script draws from, as token streams: a training stream (filler in training rows) and a
    held-out one (the distractor conversations and the CE-cost rows), from different seeds."""

    def __init__(self, tokenizer, settings):
        self.tokenizer = tokenizer
        train_rng, held_out_rng = random.Random(1), random.Random(2)
        self.stream = torch.tensor(self.encode([filler_sentence(train_rng) for _ in range(20_000)]))
        held_out = torch.tensor(
            self.encode([filler_sentence(held_out_rng) for _ in range(40 * settings.ce_paragraphs)])
        )
        self.cost_ids = [held_out[None, i * 128 : (i + 1) * 128] for i in range(settings.ce_paragraphs)]
        self.held_out_rng = held_out_rng

    def encode(self, sentences: list[str]) -> list[int]:
        return [t for sentence in sentences for t in self.tokenizer(sentence, add_special_tokens=False).input_ids]

    def window(self, length: int, rng: random.Random) -> list[int]:
        start = rng.randrange(len(self.stream) - length)
        return self.stream[start : start + length].tolist()

    def distractor(self, index: int, settings) -> list[str]:
        """Conversation `index`: `distractor_turns` messages of about `distractor_words` words each (held-out filler)."""
        rng = random.Random(10_000 + index)
        messages = []
        for _ in range(settings.distractor_turns):
            sentences = []
            while sum(len(x.split()) for x in sentences) < settings.distractor_words:
                sentences.append(filler_sentence(rng))
            messages.append(" ".join(sentences))
        return messages


def training_rows(settings, tokenizer, corpus: Corpus, n: int, seed: int) -> Dataset:
    """Rows of two chunks: held-in filler text (every token a target), "carry" facts (10 told in chunk 1, asked in
    chunk 2: only the carried state can answer) or "context" facts (4-9 told and some asked inside chunk 1). In fact
    rows only the asked codes are targets: the names and codes told are random, nothing else there can be learned.
    Each sentence is tokenized alone, as session messages are; filler text fills each chunk up."""
    rng = random.Random(seed)
    L = settings.chunk_length
    names = NAMES

    def fill(ids: list[int], targets: list[int]) -> tuple[list[int], list[int]]:
        if len(ids) > L:
            raise ValueError(f"a fact chunk has {len(ids)} tokens: chunk_length={L} is too small for it")
        return ids + corpus.window(L - len(ids), rng), targets + [-100] * (L - len(ids))

    def told(pairs) -> tuple[list[int], list[int]]:
        ids = [t for name, code in pairs for t in fact_ids(tokenizer, question(settings.fact_form, name), code)]
        return ids, [-100] * len(ids)

    def asked(pairs) -> tuple[list[int], list[int]]:
        ids, targets = [], []
        for name, code in pairs:
            forms = (question, paraphrase) if FORMS[settings.fact_form][2] else (question,)
            sentence = fact_ids(tokenizer, rng.choice(forms)(settings.fact_form, name), code)
            ids += sentence
            targets += [-100] * (len(sentence) - 2) + sentence[-2:-1] + [-100]  # the code, before the full stop
        return ids, targets

    sentence_length = max(len(fact_ids(tokenizer, f(settings.fact_form, n), c)) for f in (question, paraphrase)
                          for n in names for c in CODES)  # fmt: skip
    rows, labels = [], []
    for _ in range(n):
        draw = rng.random()
        pairs = list(zip(rng.sample(names, settings.facts), rng.sample(CODES, settings.facts)))
        if draw < settings.carry_share:
            first, second = fill(*told(pairs)), fill(*asked(rng.sample(pairs, len(pairs))))
            ids, targets = first[0] + second[0], first[1] + second[1]
        elif draw < settings.carry_share + settings.context_share:
            room = L // sentence_length
            most = min(settings.facts, room - 1)
            k = rng.randint(min(4, most), most)
            questions = rng.sample(pairs[:k], min(k, room - k))
            (a, b), (c, d) = told(pairs[:k]), asked(questions)
            ids, targets = fill(a + c, b + d)
            ids, targets = ids + corpus.window(L, rng), targets + [-100] * L
        else:
            ids = corpus.window(2 * L, rng)
            targets = list(ids)
        rows.append(ids)
        labels.append(targets)
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": labels})


def reading_rows(settings, tokenizer, corpus: Corpus, n: int, seed: int) -> Dataset:
    """Rows that teach a plain decoder to read a fact from its own context (the oracle's skill). A fact row is
    multi-query associative recall in the session's own tokens: `facts` statements "NAME WORD." (each sentence
    tokenized alone, as a session encodes a message), then the same names asked in a random order, each answered.
    WORD is a code or a filler word (52 values, so no guess among the codes pays), every token a target, as in the
    MQAR rows that formed the lookup at this size (`eval/recall_base.py`), or with `settings.reading_loss_on="answers"`
    the asked words alone (as phase 1's recall warm-up: the random facts' loss no longer drowns the lookup's).
    `settings.reading_share` of the rows are facts, the rest held-in filler text of the same length (the language the
    distractors are written in; no loss under "answers")."""
    rng = random.Random(seed)
    words = CODES + [w for kind in FILLER.values() for w in kind]
    form = settings.fact_form
    length = 2 * settings.facts * max(len(fact_ids(tokenizer, question(form, n), w)) for n in NAMES for w in words)
    rows = []
    for _ in range(n):
        if rng.random() < settings.reading_share:
            pairs = list(zip(rng.sample(NAMES, settings.facts), [rng.choice(words) for _ in range(settings.facts)]))
            told = [fact_ids(tokenizer, question(form, name), word) for name, word in pairs]
            order = rng.sample(range(len(pairs)), len(pairs))
            asked = [told[i] for i in order]
            ids = [t for sentence in told + asked for t in sentence]
            labels = list(ids)
            if settings.reading_loss_on == "answers":  # the loss on the asked words only: the lookup's own signal
                labels = [-100] * len(ids)
                at = sum(len(sentence) for sentence in told)
                for i, sentence in zip(order, asked):
                    start = at + len(tokenizer(question(form, pairs[i][0]), add_special_tokens=False).input_ids)
                    answer = tokenizer(f" {pairs[i][1]}", add_special_tokens=False).input_ids
                    labels[start : start + len(answer)] = sentence[start - at : start - at + len(answer)]
                    at += len(sentence)
            fill = corpus.window(length - len(ids), rng)  # a longer form's rows are filled up with text
            ids, labels = ids + fill, labels + (fill if settings.reading_loss_on == "all" else [-100] * len(fill))
        else:
            ids = corpus.window(length, rng)
            labels = ids if settings.reading_loss_on == "all" else [-100] * length
        rows.append((ids, labels))
    return Dataset.from_dict(
        {"input_ids": [r[0] for r in rows], "attention_mask": [[1] * length] * n, "labels": [r[1] for r in rows]}
    )
