"""Phase 4, online learning: a conversation over `generate` with the memory stack live.

A `CTMOnlineSession` holds one model and its memories across conversations:

- at the start of a conversation it **recalls** an episode (`CTMEpisodicMemory.recall`) by the first message and, if
  one is close enough, starts from that thinking state instead of the learned start state;
- during it the thinking state and the attention KV are carried turn to turn through one `CTMCache` (`generate` with
  `cache=`), and the plasticity statistics, if plasticity is on, are gathered by its tick observer;
- at its end the **Hebbian edit** is applied and the episode **stored** (keyed by the user's messages, valued by the
  final thinking state); every `sleep_every` conversations the
  session **sleeps** on the hardest conversations it has had;
- `learn_from` (a separate, stated mode, off by default) takes one small gradient step per message, pulled towards the
  weights the session started with.

The whole "brain" (weights, episodic memory, plasticity anchors, counters) saves and loads as safetensors + JSON,
atomically (`save` / `CTMOnlineSession.load`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LogitsProcessorList

from ..cache_ctm import CTMCache
from ..io_ctm import atomic_write, load_safetensors_file, replace_folder_atomically, write_json_atomically
from ..modeling_ctm import CTMForCausalLM
from .contextual import ContextualLogitsProcessor, ContextualMemory
from .episodic import CTMEpisodicMemory
from .plasticity import HebbianPlasticity, PlasticityConfig
from .sleep import ConsolidationConfig, Consolidator, ReplayHeap, score_sequences, sleep


SESSION_FILE = "session.json"
LEARN_FROM_FILE = "learn_from.safetensors"  # learn_from's pull-back anchor, once it has been taken
# `say` passes these to `generate` itself: the conversation is the context, and its cache is the session's
SESSION_GENERATE_ARGUMENTS = ("inputs", "input_ids", "attention_mask", "cache", "past_key_values", "use_cache",
                              "return_dict_in_generate", "pad_token_id", "assistant_model")  # fmt: skip


@dataclass
class OnlineConfig:
    """What the session does with each conversation.

    recall_threshold: cosine similarity an episode's key needs to be recalled (see `CTMEpisodicMemory.recall`).
    store: store every finished conversation as an episode.
    sleep_every: sleep after this many conversations (None: never).
    learn_rate: `learn_from` step size per message (0: off; plain SGD on the trainable parameters).
    learn_anchor: weight of the L2 pull towards the weights the session started with, in the `learn_from` loss.
    max_new_tokens: reply length.
    chat_template: wrap each message in the tokenizer's chat template (a converted chat model); the episode is still
        filed under the user's own words.
    system: the system prompt of every conversation, with `chat_template` (None: the template's default, if any).
    """

    recall_threshold: float = 0.5
    store: bool = True
    sleep_every: int | None = None
    learn_rate: float = 0.0
    learn_anchor: float = 1.0
    max_new_tokens: int = 32
    chat_template: bool = False
    system: str | None = None

    def __post_init__(self):
        checks = {
            "recall_threshold": (-1.0 <= self.recall_threshold <= 1.0, "a cosine similarity in [-1, 1]"),
            "sleep_every": (self.sleep_every is None or self.sleep_every >= 1, "None or an integer >= 1"),
            "learn_rate": (self.learn_rate >= 0, "a number >= 0"),
            "learn_anchor": (self.learn_anchor >= 0, "a number >= 0"),
            "max_new_tokens": (self.max_new_tokens >= 1, "an integer >= 1"),
            "system": (self.system is None or (isinstance(self.system, str) and self.system.strip() != ""),
                       "None or a non-empty string"),  # fmt: skip
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(
                    f"OnlineConfig.{name}={getattr(self, name)!r} is invalid: allowed values are {allowed}"
                )


class CTMOnlineSession:
    """Conversations with one model whose memories persist between them. See the module docstring.

    Args:
        model: a `CTMForCausalLM` with `ctm_carry="chunk"` (the carried thinking state is what memory is made of); or
            one with no thinking layers (`ctm_layers="none"`, e.g. a converted Llama), as a plain chat: the KV is
            carried turn to turn, and no memory, plasticity or sleep can be attached.
        tokenizer: its tokenizer.
        memory: a `CTMEpisodicMemory` for this model's shape, or None (no recall, no store).
        plasticity: a `HebbianPlasticity` bound to `model`, or None (no Hebbian edits).
        heap, consolidator: a `ReplayHeap` of past conversations and a `Consolidator`, both or neither (no sleep).
        config: an `OnlineConfig`.
    """

    def __init__(
        self,
        model: CTMForCausalLM,
        tokenizer,
        memory: CTMEpisodicMemory | None = None,
        plasticity: HebbianPlasticity | None = None,
        heap: ReplayHeap | None = None,
        consolidator: Consolidator | None = None,
        config: OnlineConfig | None = None,
        contextual: ContextualMemory | None = None,
    ):
        if not model.config.ctm_layer_indices:
            attached = [name for name, part in (("memory", memory), ("plasticity", plasticity), ("sleep", heap))
                        if part is not None]  # fmt: skip
            if attached:
                raise ValueError(
                    f"{', '.join(attached)} need thinking state, and this model has ctm_layers='none' (none to "
                    "carry): convert it with thinking layers (ctm convert ... --set ctm_layers=last --set "
                    "ctm_carry=chunk --set ctm_chunk_size=1) or chat without them"
                )
        elif model.config.ctm_carry != "chunk":
            raise ValueError(
                f"CTMOnlineSession needs a model with ctm_carry='chunk' (got ctm_carry={model.config.ctm_carry!r}): "
                "without a carried thinking state there is nothing to remember between turns"
            )
        if memory is not None:
            memory.check_model(model.config)
        if plasticity is not None and plasticity.model is not model:
            raise ValueError("plasticity is bound to another model: build it with HebbianPlasticity(session_model)")
        if (heap is None) != (consolidator is None):
            raise ValueError(
                "sleep needs both a ReplayHeap (what to replay) and a Consolidator (how): pass both or neither"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.memory = memory
        self.plasticity = plasticity
        self.heap = heap
        self.consolidator = consolidator
        self.config = config or OnlineConfig()
        self.contextual = contextual  # facts told with `tell_fact`, read by `score`
        if self.config.sleep_every and heap is None:
            raise ValueError(f"OnlineConfig.sleep_every={self.config.sleep_every} needs a heap and a consolidator")
        self.conversations = 0
        self.messages = 0
        self.recalls = 0
        self._anchor: dict[str, torch.Tensor] | None = None  # learn_from's pull-back target, taken at first use
        self._end_conversation_state()

    def _end_conversation_state(self):
        self.ids: torch.Tensor | None = None
        self.cache: CTMCache | None = None
        self.user_ids: list[torch.Tensor] = []  # the user's messages: what the episode is filed under
        self.recalled = False
        self.chat: list[dict] = []  # with chat_template: the conversation as messages (system, user, assistant, ...)
        self.reply_closing = ""  # with chat_template: the template's text after the last reply, not yet in `ids`
        self.reply_ids: torch.Tensor | None = None  # the last reply's generated tokens
        self.read_mask: torch.Tensor | None = None  # over `ids`: the text the fact memory reads (messages, replies)
        self._turn_text = ""  # with chat_template: the text of the last turn `template_turn` rendered

    # -- a conversation ------------------------------------------------------------------------------------------------

    def encode(self, message: str, used: int | None = None) -> torch.Tensor:
        """`message` as token ids, checked to fit after `used` tokens (default: the conversation so far)."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError(f"message={message!r} is invalid: a conversation turn needs non-empty text")
        ids = self.tokenizer(message, return_tensors="pt", add_special_tokens=False).input_ids.to(self.model.device)
        self.check_room(ids, used)
        return ids

    def check_room(self, ids: torch.Tensor, used: int | None = None) -> None:
        if used is None:
            used = 0 if self.ids is None else self.ids.shape[1]
        room = self.model.config.max_position_embeddings - used - self.config.max_new_tokens
        if ids.shape[1] > room:
            raise ValueError(
                f"message is {ids.shape[1]} tokens; this conversation has room for {max(room, 0)} more "
                f"(max_position_embeddings={self.model.config.max_position_embeddings}, {used} used, "
                f"max_new_tokens={self.config.max_new_tokens}): call end() and start a new conversation"
            )

    # the chat template renders whole conversations; a turn is what rendering one more message adds
    REPLY_SENTINEL = "\u2063CTM-REPLY\u2063"

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def template_turn(self, message: str) -> torch.Tensor:
        """The tokens a user message adds to the conversation under the chat template: the template's closing of the
        last reply (what follows the generated end-of-turn token), the message, and the prompt for the next reply. The
        replies stay the tokens the model generated; only the template's own text is rendered."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("OnlineConfig.chat_template=True, but the tokenizer has no chat_template")
        if self.ids is None:
            self.chat = [{"role": "system", "content": self.config.system}] if self.config.system else []
        turn = [*self.chat, {"role": "user", "content": message}]
        text = self._render(turn, add_generation_prompt=True)
        if self.ids is not None:
            before = self._render(self.chat, add_generation_prompt=False)
            if not text.startswith(before):
                raise ValueError(
                    "the tokenizer's chat template renders the earlier turns differently once a message is added: a "
                    "conversation cannot be carried in one cache with it (OnlineConfig.chat_template=False reads raw "
                    "text)"
                )
            text = self.reply_closing + text[len(before) :]
        self.chat = turn
        self._turn_text = text
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.model.device)
        self.check_room(ids)
        return ids

    def _record_reply(self, reply_ids: torch.Tensor) -> str:
        """Add the generated reply to `chat` and work out the template text that closes it (minus the end-of-turn
        token, when the model generated it)."""
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
        rendered = self._render([*self.chat, {"role": "assistant", "content": self.REPLY_SENTINEL}], False)
        closing = rendered.split(self.REPLY_SENTINEL, 1)[1] if self.REPLY_SENTINEL in rendered else ""
        ended = self.tokenizer.decode(reply_ids[-1:], skip_special_tokens=False) if len(reply_ids) else ""
        if ended and closing.startswith(ended):
            closing = closing[len(ended) :]
        self.reply_closing = closing
        self.chat.append({"role": "assistant", "content": reply})
        return reply

    def tell_fact(self, message: str, subject: str | tuple[int, int], value: str | tuple[int, int]) -> float:
        """Write the fact `message` states into the contextual memory. `subject` and `value` are words of the message
        (their first occurrence) or (start, end) character spans in it; the subject's last token and the value's first
        token are the write's positions. With `chat_template` the message is read as a conversation's first user turn
        (what a later question is read in), the relation from the message's own tokens. Returns what the delta rule
        wrote (0 for a fact already held)."""
        if self.contextual is None:
            raise ValueError("tell_fact needs a session built with contextual=ContextualMemory.for_model(...)")
        self.encode(message, used=0)  # checks the message and that it fits

        def span(part, name):
            if isinstance(part, str):
                found = re.search(rf"(?<!\w){re.escape(part)}(?!\w)", message) if part.strip() else None
                if found is None:
                    raise ValueError(f"{part!r} is not a word of message={message!r}: allowed values are its words")
                return found.span()
            if not (isinstance(part, tuple) and len(part) == 2 and 0 <= part[0] < part[1] <= len(message)):
                raise ValueError(f"{name}={part!r} is invalid: allowed values are a word of the message or a (start, "
                                 f"end) span with 0 <= start < end <= {len(message)}")  # fmt: skip
            return part

        (subject_start, subject_end), (value_start, value_end) = span(subject, "subject"), span(value, "value")
        text, at = message, 0
        if self.config.chat_template:
            chat = [{"role": "system", "content": self.config.system}] if self.config.system else []
            text = self._render([*chat, {"role": "user", "content": message}], add_generation_prompt=False)
            at = text.rindex(message)
        ids, offsets = self._tokens_with_offsets(text)

        def tokens(lo, hi):
            return [i for i, (a, b) in enumerate(offsets) if a < at + hi and b > at + lo]

        subject_tokens, value_tokens = tokens(subject_start, subject_end), tokens(value_start, value_end)
        read = self._message_mask(text, message, offsets)
        with self._aside():
            return self.contextual.write(self.model, self.tokenizer, ids, subject_tokens[-1], value_tokens[0], text=read)

    @contextlib.contextmanager
    def _aside(self):
        """Forwards that are no part of the conversation (the fact memory's writes and reads): plasticity gathers no
        statistics from them, and no tick observer (a confidence recorder) sees them."""
        gathering = self.plasticity is not None and self.plasticity.enabled
        if gathering:
            self.plasticity.disable()
        registry = self.model.base_model.tick_observers
        held = dict(registry)
        registry.clear()
        try:
            yield
        finally:
            registry.update(held)
            if gathering:
                self.plasticity.enable()

    def _tokens_with_offsets(self, text: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """`text` as 1-D token ids with each token's (start, end) characters (a fast tokenizer's offset mapping)."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "the fact memory finds words by character offsets, which need a fast tokenizer (is_fast=True): load "
                "it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return torch.tensor(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]

    def _message_mask(self, text: str, message: str, offsets: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """True at the tokens of `text` that belong to `message` (its last occurrence): what the fact memory reads,
        not the chat template's scaffolding. `offsets`: `text`'s token offsets, when the caller has them."""
        if offsets is None:
            if not getattr(self.tokenizer, "is_fast", False):
                return torch.ones(len(self.tokenizer(text, add_special_tokens=False).input_ids), dtype=torch.bool)
            _, offsets = self._tokens_with_offsets(text)
        at = text.rindex(message)
        return torch.tensor([a < at + len(message) and b > at for a, b in offsets], dtype=torch.bool)

    def say(self, message: str, read_facts: bool = True, **generate_kwargs) -> str:
        """One turn: the message goes in, the model's greedy reply (unless `generate_kwargs` say otherwise) comes back.
        The first turn of a conversation recalls an episode; every turn carries the cache forward.

        Any decoding `generate` runs for a CTM works (greedy, sampling, beam search, `num_return_sequences`); when it
        produces several rows, the conversation continues with the first (beam search: the best beam), and its
        thinking state and KV are those of that row alone, as if it had been the only one. The arguments the session
        passes itself (`SESSION_GENERATE_ARGUMENTS`) are refused by name.

        With a fact memory (`contextual`) holding facts, its read steers the reply (a logits processor), unless
        `read_facts` is False (`ctm chat` turns it off for a message that itself stated facts: the reply is to the
        statement, not a question about it)."""
        taken = sorted(set(generate_kwargs) & set(SESSION_GENERATE_ARGUMENTS))
        if taken:
            raise ValueError(
                f"say() got {', '.join(taken)}: the session passes {', '.join(SESSION_GENERATE_ARGUMENTS)} to generate "
                "itself (the conversation is the context and carries its own cache); allowed are the other generate "
                "arguments (max_new_tokens, do_sample, temperature, num_beams, num_return_sequences, ...)"
            )
        user_ids = self.encode(message)
        ids = self.template_turn(message) if self.config.chat_template else user_ids
        if self.ids is None:
            self._begin(user_ids)
        self.user_ids.append(user_ids)
        if self.config.learn_rate:
            self.learn_from(ids)
        context = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)
        kwargs = {"max_new_tokens": self.config.max_new_tokens, "do_sample": False, **generate_kwargs}
        if self.contextual is not None:
            turn = self._message_mask(self._turn_text, message) if self.config.chat_template else None
            turn = torch.ones(ids.shape[1], dtype=torch.bool) if turn is None else turn
            self.read_mask = turn if self.read_mask is None else torch.cat([self.read_mask, turn])
            if read_facts and len(self.contextual.subjects):  # the read steers the reply: the fact memory's logit bias
                reader = ContextualLogitsProcessor(self.contextual, self.model, self.tokenizer, self.read_mask,
                                                   reply=True, aside=self._aside)  # fmt: skip
                kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), reader])
        one_row = self._rows_generated(kwargs) == 1
        with torch.no_grad():
            if one_row:
                if self.plasticity is not None:
                    self._read(context)
                out = self._generate(context, self.cache, kwargs)
                self.ids, self.cache = out.sequences, out.cache
            else:
                # beams and extra samples run on a copy, and the chosen row is then read into the session's own
                # cache: every row's state would otherwise be carried (and the statistics gathered from all of them)
                gathering = self.plasticity is not None and self.plasticity.enabled
                if gathering:
                    self.plasticity.disable()
                try:
                    out = self._generate(context, copy.deepcopy(self.cache), kwargs)
                finally:
                    if gathering:
                        self.plasticity.enable()
                self.ids = out.sequences[:1]
                self._read(self.ids)
        self.messages += 1
        if self.read_mask is not None:  # the reply is text the fact memory reads, as the messages are
            reply = torch.ones(self.ids.shape[1] - len(self.read_mask), dtype=torch.bool)
            self.read_mask = torch.cat([self.read_mask, reply])
        self.reply_ids = self.ids[0, context.shape[1] :]  # the reply's own tokens (read by ctm chat's confidence marks)
        if self.config.chat_template:
            return self._record_reply(self.ids[0, context.shape[1] :])
        return self.tokenizer.decode(self.ids[0, context.shape[1] :], skip_special_tokens=True)

    def _rows_generated(self, kwargs: dict) -> int:
        config = copy.deepcopy(kwargs.get("generation_config") or self.model.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
        return max(config.num_beams or 1, config.num_return_sequences or 1)

    def _generate(self, context: torch.Tensor, cache: CTMCache | None, kwargs: dict):
        return self.model.generate(
            context,
            attention_mask=torch.ones_like(context),
            cache=cache,
            use_cache=True,  # the conversation lives in its cache, whatever the config says (a Trainer sets it off)
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
            **kwargs,
        )

    @torch.no_grad()
    def score(self, message: str | Sequence[str], candidates: Sequence[str]) -> dict:
        """How the brain as it is now would continue `message` if it opened a new conversation: the summed
        log-probability of each candidate continuation, and whether greedy decoding would produce it token for token.
        The episode recall happens as at the start of a conversation; nothing else does, so the brain is left exactly
        as it was (no episode stored, no statistics, no counter or recency moved). How a sceptic asks "does it
        remember?" without the question itself becoming a memory.

        With `chat_template`, the messages are rendered as the user turns of a new conversation, followed by the
        template's prompt for the reply (the candidates continue it); the recall is still made by the first message's
        own words.

        `message` may be a list of messages: each is encoded on its own, as `say` encodes the turns of a conversation
        (a word that opens a message is often another token than the same word after a space), and the recall is made
        by the first, as a conversation's first turn makes it.

        Returns `{"log_probs": (C,) float, "greedy": (C,) bool, "recalled": bool}` for the C candidates."""
        if self.ids is not None:
            raise ValueError("score() opens a conversation of its own: end() the one under way first")
        if isinstance(candidates, str) or not candidates or not all(isinstance(c, str) and c for c in candidates):
            raise ValueError(
                f"candidates={candidates!r} is invalid: allowed values are a non-empty list of non-empty strings"
            )
        messages = [message] if isinstance(message, str) else list(message)
        if not messages:
            raise ValueError("message=[] is invalid: allowed values are a message or a non-empty list of messages")
        encoded, read = [], None
        for m in messages:
            encoded.append(self.encode(m, used=sum(e.shape[1] for e in encoded)))
        ids = torch.cat(encoded, dim=1)
        if self.config.chat_template:  # asked as a chat model is asked: the messages as user turns, then the reply
            chat = [{"role": "system", "content": self.config.system}] if self.config.system else []
            chat += [{"role": "user", "content": m} for m in messages]
            text = self._render(chat, add_generation_prompt=True)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.model.device)
            self.check_room(ids, used=0)
            if self.contextual is not None:  # the fact memory reads the messages, not the template around them
                read = torch.zeros(ids.shape[1], dtype=torch.bool)
                for m in messages:
                    read |= self._message_mask(text, m)
        cache = None
        if self.memory is not None and len(self.memory):
            cache = self.memory.recall(self.model, encoded[0], threshold=self.config.recall_threshold, mark_used=False)
        recalled = cache is not None
        prefix = self.model(ids, cache=cache if recalled else CTMCache(self.model.config), use_cache=True,
                            output_hidden_states=self.contextual is not None)  # fmt: skip
        rows = [self.tokenizer(c, add_special_tokens=False).input_ids for c in candidates]
        if not all(rows):
            raise ValueError(
                f"candidates={candidates!r} is invalid: every candidate must encode to at least one token"
            )
        length = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # right padding: causal attention keeps the pad slots from reaching the real tokens before them
        targets = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=ids.device)
        real = torch.tensor([[i < len(r) for i in range(length)] for r in rows], device=ids.device)
        logits = prefix.logits[:, -1:].float()
        if self.contextual is not None:  # the fact memory's read, at the answer's first token
            states = prefix.hidden_states[self.contextual.config.layer][0]
            bias = self.contextual.logit_bias(self.tokenizer, ids[0].cpu(), states.cpu(), read)[-1]
            logits = logits + bias.to(logits)
        logits = logits.expand(len(rows), 1, -1)
        if length > 1:
            prefix.cache.batch_repeat_interleave(len(rows))
            rest = self.model(targets[:, :-1], cache=prefix.cache, use_cache=True).logits.float()
            logits = torch.cat([logits, rest], dim=1)
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
        greedy = (logits.argmax(-1) == targets) | ~real
        return {
            "log_probs": (log_probs * real).sum(1).cpu(),
            "greedy": greedy.all(1).cpu(),
            "recalled": recalled,
        }

    def _read(self, context: torch.Tensor) -> None:
        """Run the not-yet-seen tokens of `context` but the last through the model into the cache, with full logits,
        so the plasticity statistics see every token of the message (`generate`'s own prefill keeps only the last
        position's logits). The same function as letting `generate` prefill: incremental equals the full forward."""
        seen = self.cache.get_seq_length() if self.cache is not None else 0
        if context.shape[1] - 1 - seen < 1:
            return
        unseen = context[:, seen:-1]
        labels = None
        if seen > 0 and unseen.shape[1] > 1 and self.plasticity is not None and self.plasticity.enabled:
            # the first unseen token is the model's own last reply token: its successor (the user's next word) is a
            # turn boundary, not something the user said after it, so plasticity must not write it
            labels = unseen.clone()
            labels[:, 1] = -100
        out = self.model(
            unseen, attention_mask=torch.ones_like(context[:, :-1]), cache=self.cache, use_cache=True, labels=labels
        )
        self.cache = out.cache

    def _begin(self, first_ids: torch.Tensor) -> None:
        if self.memory is not None and len(self.memory):
            self.cache = self.memory.recall(self.model, first_ids, threshold=self.config.recall_threshold)
        self.recalled = self.cache is not None
        self.recalls += int(self.recalled)
        if self.plasticity is not None:
            self.plasticity.enable()  # statistics from every forward of this conversation, generate's included

    def end(self) -> dict:
        """End the conversation: apply the Hebbian edit, store the episode, sleep if it is time. Returns what
        happened."""
        if self.ids is None:
            raise ValueError("end() called with no conversation under way: say() something first")
        report = {"tokens": int(self.ids.shape[1]), "recalled": self.recalled}
        if self.plasticity is not None:
            self.plasticity.disable()
            report["plasticity"] = self.plasticity.apply()
        if self.memory is not None and self.config.store:
            # filed under the user's words, not the model's replies: the next conversation asks with its first message
            report["stored"] = self.memory.is_storable(self.cache)
            if report["stored"]:  # an overflowed state is dropped, not filed (it would seed NaN into later ones)
                self.memory.store(self.model, torch.cat(self.user_ids, dim=1), self.cache)
            report["episodes"] = len(self.memory)
        if self.heap is not None:
            losses = score_sequences(self.model, self.ids, self.ids)
            self.heap.offer(self.ids.cpu(), self.ids.cpu(), losses.cpu())
        self.conversations += 1
        if self.config.sleep_every and self.conversations % self.config.sleep_every == 0:
            # compaction through the session's own Hebbian rule (its statistics were just applied and reset)
            slept = sleep(self.model, self.heap, self.consolidator, step=self.conversations, compactor=self.plasticity)
            report["sleep"] = slept.to_json()
            self.model.eval()
        self._end_conversation_state()
        return report

    # -- learn_from: the gradient mode ---------------------------------------------------------------------------------

    def learn_from(self, ids: torch.Tensor) -> float:
        """One SGD step of the language-model loss on `ids`, plus `learn_anchor` x the squared distance of the
        trainable weights from where the session started (so a long life does not drift without bound)."""
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if self._anchor is None:
            self._anchor = {name: p.detach().clone() for name, p in params.items()}
        self.model.train()
        try:
            loss = self.model(ids, labels=ids).loss
            pull = sum(((p - self._anchor[name]) ** 2).sum() for name, p in params.items())
            grads = torch.autograd.grad(
                loss + self.config.learn_anchor * pull, list(params.values()), allow_unused=True
            )
            with torch.no_grad():
                for p, grad in zip(params.values(), grads):
                    if grad is not None and torch.isfinite(grad).all():
                        p.sub_(self.config.learn_rate * grad)
        finally:
            self.model.eval()
        return float(loss.detach())

    # -- the brain on disk ---------------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the brain into `folder`, atomically as a whole (a sibling temp folder renamed into place): `model/`
        (weights, config, tokenizer), `memory/`, `contextual/` (the fact memory), `plasticity.safetensors` + `.json` (anchors, pending statistics,
        counters), `sleep.safetensors` + `.json` (heap and consolidation optimizer), `learn_from.safetensors`
        (learn_from's pull-back anchor, once taken), `session.json` (config, counters, which parameters train). A
        loaded brain continues exactly as this one would. A conversation under way is not part of the brain: end() it first."""
        if self.ids is not None:
            raise ValueError(
                "save() during a conversation: call end() first (the brain is saved between conversations)"
            )
        folder = Path(folder)
        replace_folder_atomically(folder, lambda tmp: self._write_brain(Path(tmp)))
        return folder

    def _write_brain(self, tmp: Path) -> None:
        """Every part of the brain into the empty folder `tmp` (`save` swaps it into place)."""
        self.model.save_pretrained(tmp / "model")
        self.tokenizer.save_pretrained(tmp / "model")
        parts = {}
        if self.memory is not None:
            self.memory.save_pretrained(tmp / "memory")
        if self.contextual is not None:
            self.contextual.save(tmp / "contextual")
        if self.plasticity is not None:
            parts["plasticity"] = self.plasticity.state()
        if self.heap is not None:
            heap_tensors, heap_meta = self.heap.state_dict()
            opt_tensors, opt_meta = self.consolidator.state_dict()
            parts["sleep"] = ({**heap_tensors, **opt_tensors}, {"heap": heap_meta, "consolidator": opt_meta})
        for name, (tensors, meta) in parts.items():
            atomic_write(tmp / f"{name}.safetensors", lambda path, t=tensors: save_file(t, path))
            write_json_atomically(tmp / f"{name}.json", meta, indent=None)
        if self._anchor is not None:
            anchor = {name: t.contiguous() for name, t in self._anchor.items()}
            atomic_write(tmp / LEARN_FROM_FILE, lambda path: save_file(anchor, path))
        state = {
            "config": asdict(self.config),
            "conversations": self.conversations,
            "messages": self.messages,
            "recalls": self.recalls,
            # which parameters learn_from and sleep may change (freeze_for_thinking, a peft adapter, ...)
            "trainable": [name for name, p in self.model.named_parameters() if p.requires_grad],
        }
        write_json_atomically(tmp / SESSION_FILE, state, indent=2)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "CTMOnlineSession":
        """The session `save` wrote, with every part it had (memory, plasticity, sleep)."""
        folder = Path(folder)
        state_file = folder / SESSION_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: no such file ({folder} is not a saved CTMOnlineSession)")
        state = _read_json(state_file)
        model = CTMForCausalLM.from_pretrained(folder / "model")
        tokenizer = AutoTokenizer.from_pretrained(folder / "model")
        memory = None
        if (folder / "memory").is_dir():
            memory = CTMEpisodicMemory.from_pretrained(folder / "memory", model_config=model.config)
        plasticity = heap = consolidator = None
        if (folder / "plasticity.json").is_file():
            meta = _read_json(folder / "plasticity.json")
            plasticity = HebbianPlasticity(model, PlasticityConfig.from_dict(meta["config"]))
            plasticity.load_state(load_safetensors_file(folder / "plasticity.safetensors", require_finite=True), meta)
        if (folder / "sleep.json").is_file():
            meta = _read_json(folder / "sleep.json")
            tensors = load_safetensors_file(folder / "sleep.safetensors")
            heap_meta = meta["heap"]
            heap = ReplayHeap(**{k: heap_meta[k] for k in ("capacity", "sampling", "temperature_floor", "max_replays",
                                                            "ranking")},
                              admission=heap_meta.get("admission", "loss"), seed=heap_meta.get("seed", 0))  # fmt: skip
            heap.load_state_dict(tensors, heap_meta)
            trained = set(meta["consolidator"]["names"])  # the parameters sleep may change, as when it was saved
            for name, param in model.named_parameters():
                param.requires_grad_(name in trained)
            consolidator = Consolidator(model, ConsolidationConfig(**meta["consolidator"]["config"]))
            consolidator.load_state_dict(tensors, meta["consolidator"])
        if "trainable" in state:  # brains saved before it was recorded keep what their sleep state implied
            trainable = set(state["trainable"])
            for name, param in model.named_parameters():
                param.requires_grad_(name in trainable)
        known = {f.name for f in fields(OnlineConfig)}
        config = OnlineConfig(**{k: v for k, v in state["config"].items() if k in known})
        contextual = ContextualMemory.load(folder / "contextual", model) if (folder / "contextual").is_dir() else None
        session = cls(model, tokenizer, memory, plasticity, heap, consolidator, config, contextual)
        if (folder / LEARN_FROM_FILE).is_file():
            session._anchor = load_safetensors_file(folder / LEARN_FROM_FILE, require_finite=True)
        session.conversations = state["conversations"]
        session.messages = state["messages"]
        session.recalls = state["recalls"]
        return session


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {error}") from None
