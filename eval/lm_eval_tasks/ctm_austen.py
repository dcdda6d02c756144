"""Documents for the lm-eval tasks in this folder, built from the held-out novel (Persuasion) of the embedded corpus:
no download, the same documents on every machine (fixed seed).

- `rolling`: one document per paragraph of at least 20 words (loglikelihood_rolling: bits per byte, perplexities);
- `cloze`: a paragraph's opening words, then the true next word against three distractors drawn from the novel's
  frequent words (multiple_choice: acc, acc_norm);
- `continuation`: the same openings, the true next word as target (generate_until, first generated word compared).
"""

import random
import re
from collections import Counter

from datasets import Dataset, DatasetDict

from modeling_ctm.training.data import HELD_OUT_NOVEL, load_austen_novels, split_paragraphs


SEED = 0
MAX_ITEMS = 300
WORD = re.compile(r"[A-Za-z]+")


def _paragraphs(min_words: int = 20) -> list[str]:
    text = load_austen_novels()[HELD_OUT_NOVEL]
    return [" ".join(p.split()) for p in split_paragraphs(text) if len(p.split()) >= min_words]


def _cloze_items() -> list[dict]:
    paragraphs = _paragraphs()
    counts = Counter(w for p in paragraphs for w in p.split() if WORD.fullmatch(w))
    vocabulary = [w for w, _ in counts.most_common(500)]
    rng = random.Random(SEED)
    items = []
    for paragraph in paragraphs:
        words = paragraph.split()
        cut = rng.randrange(8, min(len(words) - 1, 40))
        answer = words[cut]
        if not WORD.fullmatch(answer):
            continue
        distractors = rng.sample([w for w in vocabulary if w != answer], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:cut]), "choices": choices, "label": choices.index(answer),
                      "answer": answer})  # fmt: skip
        if len(items) == MAX_ITEMS:
            break
    return items


def rolling(**kwargs) -> DatasetDict:
    return DatasetDict({"test": Dataset.from_list([{"text": p} for p in _paragraphs()[:MAX_ITEMS]])})


def cloze(**kwargs) -> DatasetDict:
    return DatasetDict({"test": Dataset.from_list(_cloze_items())})

