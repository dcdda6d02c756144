"""The chat format and the arms of the facts protocol (eval/facts.py): how a fact is told, how an arm hears it,
saves and reloads itself, and scores a query's candidates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from facts_world import sentence

from modeling_ctm.memory.contextual import ContextualConfig, ContextualLogitsProcessor, ContextualMemory
from modeling_ctm.memory.statements import find_statements


ORACLE_REPLY = "Got it, I'll remember that."


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


class ExtractedArm(ContextualArm):
    """The contextual memory with nobody telling it the subject and value: `find_statements` finds them in the told
    sentence, as `ctm chat` does, and the write takes what it found (nothing, for a sentence it does not parse)."""

    name = "contextual_extracted"

    def __init__(self, chat, memory: ContextualMemory):
        super().__init__(chat, memory)
        self.heard = self.found = 0

    def hear_fact(self, fact):
        start = time.perf_counter()
        self.heard += 1
        tokenizer = self.chat.tokenizer
        statements = find_statements(sentence(fact))
        self.found += any(s.subject_text == fact["subject"] and s.value_text == fact["value"] for s in statements)
        for statement in statements:
            text, subject, value = statement.written()
            ids, read = self.chat.ids([{"role": "user", "content": text}])
            first = int(read.nonzero()[0])  # the message's tokens: tokenized on their own, as `Chat.ids` does
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            subject_end = first + max(i for i, (a, b) in enumerate(offsets) if a < subject[1] and b > subject[0])
            value_start = first + min(i for i, (a, b) in enumerate(offsets) if a < value[1] and b > value[0])
            self.memory.write(self.chat.model, tokenizer, ids, subject_end, value_start, text=read)
            self.written_tokens += int(read.sum())
        self.write_seconds += time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


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
    return ExtractedArm(chat, memory) if name == "contextual_extracted" else ContextualArm(chat, memory)


@torch.no_grad()
def held_out_ce(chat: Chat, arm: Arm, ids: torch.Tensor) -> float:
    out = chat.model(ids[None], output_hidden_states=True)
    logits = out.logits[0, :-1].float()
    if isinstance(arm, ContextualArm):
        logits = (
            logits + arm.memory.logit_bias(chat.tokenizer, ids, out.hidden_states[arm.memory.config.layer][0])[:-1]
        )
    return float(F.cross_entropy(logits, ids[1:]))
