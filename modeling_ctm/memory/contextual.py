# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""A fact memory keyed by subject x relation, so facts told in everyday sentences survive paraphrase and do not collide.

The token memory keys a write on the token *before the value*. In "my sister is called Anna" and "our dog is called
Rex" that token is " called" in both, so the two facts share one slot; and an unseen paraphrase ("what is my sister's
name?") has another token there, so it recalls nothing. Memories that survive paraphrase (ROME/MEMIT, Larimar) key on
what the fact is *about*. This one does, in three parts:

* **Subject key.** The hidden state at the subject's last token, from an early decoder layer (`layer`), centred by a
  running mean of subject keys and normalised: raw states of a trained model sit in a narrow cone (different subjects'
  raw cosines 0.6-0.9 on SmolLM2), centred ones separate them.
* **Relation key.** The mean of the centred, normalised input embeddings of the content words of the sentence other
  than the subject and the value ("sister", "called"): a paraphrase of the question shares some of them ("name",
  "sister"), another relation of the same subject ("flat", "city") shares none.
* **Binding and write.** The key is the tensor product subject x relation, kept in dual form (the two factors and one
  coefficient vector per write), so the kernel between two keys is phi(cos_subject) x phi(cos_relation), with
  ``phi(c) = relu((c - t) / (1 - t))`` cutting the small cosines unrelated keys still have. The value is the centred,
  normalised embedding of the value's first token. Writes follow the delta rule in that kernel, ``a_new = beta (v -
  read(k))``: a fact told twice writes nothing the second time, and a new value for the same subject and relation
  writes the difference, so it replaces the old one.

The read happens outside the model, as a logit bias: ``strength x (v_hat . E_c)`` for every vocabulary token, with E_c
the centred, normalised input embeddings (`logit_bias`). The same function scores candidates and, as a
`LogitsProcessor`, steers `generate`. Outside because the model file imports nothing from memory/ and a fact memory
needs no thinking state; the key needs one forward with `output_hidden_states`.

Cost: per write, two vectors of the hidden size and one of the embedding size (float32), plus the running mean; the
read is one (positions x writes) kernel and one (positions x vocabulary) product.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LogitsProcessor

from ..io_ctm import load_safetensors_file, save_folder_atomically


CONFIG_FILE = "contextual_config.json"
TENSORS_FILE = "contextual.safetensors"

# words that carry no relation: the read's relation key averages the others
STOPWORDS = frozenset(
    """a an the is are was were be been am i me my mine you your yours he him his she her hers it its we our us they
    their them this that these those of in on at to for from by with and or but so as what who whom whose which when
    where how do does did has have had not no yes s t just also there here about tell know please okay ok hi hello
    called named name""".split()
)
# "called"/"named"/"name" are stop words on purpose: every relation of the "is called X" kind shares them, so they
# would make the relations of one subject (its sister, its dog) look alike


@dataclass
class ContextualConfig:
    """The subject x relation fact memory. Every field is checked; a bad value raises `ValueError` naming it.

    Args:
        layer: the decoder layer whose output at the subject's last token is the subject key (0 = the embeddings).
        subject_threshold: centred cosines of subject keys at or below this count as another subject.
        relation_threshold: cosines of relation keys at or below this count as another relation.
        strength: the logit bias a full match adds to the value's token (nats).
        learning_rate: the delta rule's step (1: a write stores its value exactly, a re-told fact writes nothing).
        capacity: the most writes held; the oldest is dropped first.
        prior_weight: how many subject keys the calibration mean counts as, in the running mean.
        value_temperature: how sharply the read's bias falls off with the cosine between the read value and a token's
            code (see `bias_from_value`).
    """

    layer: int = 4
    subject_threshold: float = 0.4
    relation_threshold: float = 0.3
    strength: float = 20.0
    learning_rate: float = 1.0
    capacity: int = 4096
    prior_weight: float = 8.0
    value_temperature: float = 0.1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def check(name, ok, allowed):
            if not ok:
                raise ValueError(
                    f"ContextualConfig.{name}={getattr(self, name)!r} is invalid: allowed values are {allowed}"
                )

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        check("layer", isinstance(self.layer, int) and not isinstance(self.layer, bool) and self.layer >= 0,
              "an integer >= 0")  # fmt: skip
        for name in ("subject_threshold", "relation_threshold"):
            value = getattr(self, name)
            check(name, number(value) and -1.0 <= value < 1.0, "a cosine in [-1, 1)")
        check("strength", number(self.strength) and self.strength > 0, "a finite number > 0")
        check("learning_rate", number(self.learning_rate) and 0 < self.learning_rate <= 1, "a number in (0, 1]")
        check("capacity", isinstance(self.capacity, int) and not isinstance(self.capacity, bool) and self.capacity >= 1,
              "an integer >= 1")  # fmt: skip
        check("prior_weight", number(self.prior_weight) and self.prior_weight > 0, "a finite number > 0")
        check(
            "value_temperature", number(self.value_temperature) and self.value_temperature > 0, "a finite number > 0"
        )

    @classmethod
    def from_dict(cls, values: dict) -> "ContextualConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ContextualConfig has no field {unknown[0]!r}: allowed fields are {sorted(known)}")
        return cls(**values)


def _phi(cos: torch.Tensor, threshold: float) -> torch.Tensor:
    return ((cos - threshold) / (1.0 - threshold)).clamp(min=0.0)


class ContextualMemory:
    """Facts as (subject key, relation key) -> value, written by the delta rule; see the module docstring.

    Build it for a model with `ContextualMemory.for_model(model, calibration_ids)`; `write` a fact from a tokenized
    sentence and the positions of its subject and value; `logit_bias` reads it at every position of a text."""

    def __init__(self, config: ContextualConfig, embeddings: torch.Tensor, subject_prior: torch.Tensor):
        self.config = config
        self.embedding_mean = embeddings.float().mean(0)
        self.codes = F.normalize(embeddings.float() - self.embedding_mean, dim=-1)  # (vocab, E): tokens as values
        self.subject_sum = subject_prior.float() * config.prior_weight
        self.subject_count = float(config.prior_weight)
        hidden, width = subject_prior.shape[-1], embeddings.shape[-1]
        self.subjects = torch.zeros(0, hidden)  # raw: centred with the current mean at every read
        self.relations = torch.zeros(0, width)
        self.coefficients = torch.zeros(0, width)
        self.writes = 0

    @classmethod
    @torch.no_grad()
    def for_model(cls, model, calibration_ids: torch.Tensor, config: ContextualConfig | None = None):
        """A memory for `model`: the subject mean starts at the mean of layer `config.layer` over the tokens of
        `calibration_ids` (ordinary text), weighted as `config.prior_weight` subject keys."""
        config = config or ContextualConfig()
        layers = model.config.num_hidden_layers
        if config.layer > layers:
            raise ValueError(f"ContextualConfig.layer={config.layer} is invalid: allowed values are 0..{layers}")
        ids = calibration_ids if calibration_ids.dim() == 2 else calibration_ids[None]
        states = model(ids, output_hidden_states=True).hidden_states[config.layer]
        return cls(config, model.get_input_embeddings().weight.detach(), states[0].float().mean(0))

    # -- keys -----------------------------------------------------------------------------------------------------------

    @property
    def subject_mean(self) -> torch.Tensor:
        return self.subject_sum / self.subject_count

    def subject_keys(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(states.float() - self.subject_mean, dim=-1)

    def content_mask(self, tokenizer, ids: torch.Tensor) -> torch.Tensor:
        """True at tokens that are content words (alphabetic, not a stop word, not a special token)."""
        words = [tokenizer.decode([int(i)]).strip().lower() for i in ids]
        special = set(tokenizer.all_special_ids)
        return torch.tensor(
            [w.isalpha() and w not in STOPWORDS and int(i) not in special for w, i in zip(words, ids)],
            dtype=torch.bool,
        )

    def relation_key(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not bool(mask.any()):
            return torch.zeros(self.codes.shape[-1])
        return F.normalize(self.codes[ids[mask]].mean(0), dim=-1)

    # -- write ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def write(
        self, model, tokenizer, ids: torch.Tensor, subject_end: int, value_start: int, text: torch.Tensor | None = None
    ) -> float:
        """Write the fact in `ids` (1-D, a whole chat prompt is fine): the subject's last token is at `subject_end`, the
        value's first token at `value_start`; the relation is the content words before the value, among the positions
        where `text` (bool, like `ids`; default all) is True (the user's message, not the chat template's scaffolding),
        other than the subject. Returns the norm of what the delta rule wrote (0 for a fact already held)."""
        if not (0 <= subject_end < value_start < len(ids)):
            raise ValueError(
                f"write positions subject_end={subject_end}, value_start={value_start} are invalid: allowed values "
                f"satisfy 0 <= subject_end < value_start < {len(ids)}"
            )
        text = torch.ones(len(ids), dtype=torch.bool) if text is None else text.bool()
        states = model(ids[None], output_hidden_states=True).hidden_states[self.config.layer][0]
        raw_subject = states[subject_end].float()
        self.subject_sum += raw_subject
        self.subject_count += 1.0
        mask = self.content_mask(tokenizer, ids) & text
        mask[value_start:] = False
        mask[subject_end] = False
        mask &= ids != ids[subject_end]  # the subject's own token elsewhere in the sentence
        relation = self.relation_key(ids, mask)
        value = self.codes[ids[value_start]]
        kernel = self._kernel(self.subject_keys(raw_subject)[None], relation[None])  # (1, writes)
        delta = self.config.learning_rate * (value - kernel[0] @ self.coefficients)
        self.subjects = torch.cat([self.subjects, raw_subject[None]])[-self.config.capacity :]
        self.relations = torch.cat([self.relations, relation[None]])[-self.config.capacity :]
        self.coefficients = torch.cat([self.coefficients, delta[None]])[-self.config.capacity :]
        self.writes += 1
        return float(delta.norm())

    def _kernel(self, subject_keys: torch.Tensor, relation_keys: torch.Tensor) -> torch.Tensor:
        """(positions, writes): phi(cos subject) x phi(cos relation) against every stored write."""
        if len(self.subjects) == 0:
            return torch.zeros(len(subject_keys), 0)
        subject_cos = subject_keys @ self.subject_keys(self.subjects).T
        relation_cos = relation_keys @ self.relations.T
        return _phi(subject_cos, self.config.subject_threshold) * _phi(relation_cos, self.config.relation_threshold)

    # -- read -----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def read(
        self, tokenizer, ids: torch.Tensor, states: torch.Tensor, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(positions, E): the value the memory returns at every position of `ids` (1-D), given the layer-`layer`
        hidden states `states` (positions, hidden) of the same forward and the positions `text` (bool, default all)
        that are the text being read (the user's message and the answer so far, not the chat scaffolding). At
        position p the subject match is the best over the text's positions up to p, the relation key the mean of the
        content words up to p that match no stored subject."""
        text = torch.ones(len(ids), dtype=torch.bool) if text is None else text.bool()
        value = torch.zeros(len(ids), self.codes.shape[-1])
        if len(self.subjects) == 0:
            return value
        subject_cos = self.subject_keys(states) @ self.subject_keys(self.subjects).T  # (positions, writes)
        subject_match = _phi(subject_cos, self.config.subject_threshold) * text[:, None]
        best = subject_match.cummax(dim=0).values
        mask = self.content_mask(tokenizer, ids) & text & (subject_match.amax(-1) == 0)
        codes = self.codes[ids] * mask[:, None]
        relation = F.normalize(codes.cumsum(0) / mask.cumsum(0).clamp(min=1)[:, None], dim=-1)
        relation_match = _phi(relation @ self.relations.T, self.config.relation_threshold)
        return (best * relation_match) @ self.coefficients

    def bias_from_value(self, value: torch.Tensor) -> torch.Tensor:
        """(..., E) read values -> (..., vocab) logit bias: strength x min(|v|, 1) x exp((cos(v, E_c) - 1) / T). The
        sharp kernel in the cosine keeps the bias on the value's own token: tokens of one kind (the months, the
        names) have centred embedding cosines of 0.5-0.8 with each other, a linear read would lift them all."""
        norm = value.norm(dim=-1, keepdim=True)
        cos = F.normalize(value, dim=-1) @ self.codes.T
        weight = torch.exp((cos - 1.0) / self.config.value_temperature)
        return self.config.strength * norm.clamp(max=1.0) * weight

    @torch.no_grad()
    def logit_bias(self, tokenizer, ids: torch.Tensor, states: torch.Tensor, text: torch.Tensor | None = None):
        """(positions, vocab): the logit bias of the memory's read at every position (see `read`)."""
        return self.bias_from_value(self.read(tokenizer, ids, states, text))

    def nbytes(self) -> int:
        held = (self.subjects, self.relations, self.coefficients, self.subject_sum)
        return sum(t.numel() * t.element_size() for t in held)

    # -- persistence ----------------------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the memory into `folder` atomically (safetensors + JSON); the embeddings are the model's, not saved."""

        def write(staging):
            tensors = {
                "subjects": self.subjects.contiguous(),
                "relations": self.relations.contiguous(),
                "coefficients": self.coefficients.contiguous(),
                "subject_sum": self.subject_sum.contiguous(),
            }
            save_file(tensors, os.path.join(staging, TENSORS_FILE))
            state = {"config": asdict(self.config), "subject_count": self.subject_count, "writes": self.writes}
            with open(os.path.join(staging, CONFIG_FILE), "w") as handle:
                json.dump(state, handle, indent=2)

        save_folder_atomically(write, str(folder))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, model) -> "ContextualMemory":
        folder = Path(folder)
        path = folder / CONFIG_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable contextual memory config: {error}") from error
        config = ContextualConfig.from_dict(state["config"])
        tensors = load_safetensors_file(folder / TENSORS_FILE, require_finite=True)
        hidden = model.config.hidden_size
        if tensors["subject_sum"].shape != (hidden,):
            raise ValueError(
                f"{folder / TENSORS_FILE}: subject_sum has shape {tuple(tensors['subject_sum'].shape)}, the model's "
                f"hidden size is {hidden}"
            )
        memory = cls(config, model.get_input_embeddings().weight.detach(), torch.zeros(hidden))
        memory.subject_sum = tensors["subject_sum"]
        memory.subject_count = float(state["subject_count"])
        memory.subjects = tensors["subjects"]
        memory.relations = tensors["relations"]
        memory.coefficients = tensors["coefficients"]
        memory.writes = int(state["writes"])
        return memory


def spelling_pairs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(spaced, bare): the ids of every token that is a word after a space (" Oslo") and of the same word without it
    ("Oslo"), where both are tokens. Read from the vocabulary's byte-level ("\u0120") or SentencePiece ("\u2581")
    space marks."""
    vocab = tokenizer.get_vocab()
    spaced, bare = [], []
    for token, index in vocab.items():
        if token[:1] in ("\u0120", "\u2581") and token[1:] in vocab:
            spaced.append(index)
            bare.append(vocab[token[1:]])
    return torch.tensor(spaced, dtype=torch.long), torch.tensor(bare, dtype=torch.long)


class ContextualLogitsProcessor(LogitsProcessor):
    """`generate`'s read of a `ContextualMemory`: the bias of `ContextualMemory.logit_bias` at the last position, from
    one forward of the whole sequence so far. `prompt_text` (bool, the prompt's length) marks the prompt positions
    that are text to read (the user's message, not the chat scaffolding); every generated token is read.

    With `reply=True` (a chat reply): the value's spelling without its leading space ("Oslo" for " Oslo") gets the same
    bias at the reply's first token, since a reply opens without a space; and once the reply has said a token the read
    favoured (at least half its top bias at that step), the read is over for this reply: the value is said once instead
    of being pushed again at every later step, tokens near it (the other weekdays near "Thursday") get no side bias
    after it, and the rest of the reply runs no forward of the read.

    `aside` (a function returning a context manager) wraps the read's own forward: a session passes one that keeps
    observers (plasticity's statistics, a confidence recorder) from seeing forwards that are no part of the text."""

    def __init__(self, memory: ContextualMemory, model, tokenizer, prompt_text: torch.Tensor, reply: bool = False,
                 aside=contextlib.nullcontext):  # fmt: skip
        self.memory, self.model, self.tokenizer = memory, model, tokenizer
        self.aside = aside
        self.prompt_text = prompt_text.bool()
        self.reply = reply
        self.spaced, self.bare = spelling_pairs(tokenizer) if reply else (None, None)
        self.favoured: dict[int, torch.Tensor] = {}  # per row: the tokens the last step's bias favoured most
        self.over: set[int] = set()  # rows whose reply has said what the read favoured: no more reads (no forwards)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - len(self.prompt_text)
        if generated < 0:
            raise ValueError(
                f"prompt_text has {len(self.prompt_text)} positions, the sequence only {input_ids.shape[1]}: pass the "
                "mask of the prompt given to generate"
            )
        text = torch.cat([self.prompt_text, torch.ones(generated, dtype=torch.bool)])
        for row in range(len(input_ids)):
            if self.reply and generated:
                favoured = self.favoured.get(row)
                if row in self.over or (favoured is not None and bool((favoured == int(input_ids[row, -1])).any())):
                    self.over.add(row)  # the value is said: the rest of the reply is the model's, and costs no read
                    continue
            with self.aside():
                states = self.model(input_ids[row : row + 1], output_hidden_states=True).hidden_states
            value = self.memory.read(self.tokenizer, input_ids[row], states[self.memory.config.layer][0], text)
            bias = self.memory.bias_from_value(value[-1]).to(scores.dtype)
            if self.reply and not generated:
                bias[self.bare] = torch.maximum(bias[self.bare], bias[self.spaced])
            if self.reply:
                peak = float(bias.max())
                favoured = (bias >= 0.5 * peak).nonzero()[:, 0] if peak > 0 else torch.zeros(0, dtype=torch.long)
                self.favoured[row] = favoured
            scores[row] = scores[row] + bias.to(scores.device)
        return scores
