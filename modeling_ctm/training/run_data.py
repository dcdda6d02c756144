"""A training run's data, from its typed recipe config: the tokenizer, packed training and held-out blocks, the
held-out paragraphs, in-context recall rows (held out, mixed into phase 1, the recall warm-up's) and phase 4's
scripted conversations."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .data import (
    answers_only,
    count_tokens_and_bytes,
    load_text_dataset,
    mix_recall_rows,
    pack_dataset,
    recall_rows,
    recall_vocabulary,
    unigram_baseline,
)
from .recipe_config import RecipeConfig
from .tokenization import get_tokenizer


@dataclass
class Data:
    tokenizer: PreTrainedTokenizerBase
    train: object
    eval: object
    bytes_per_token: float
    unigram_nats: float
    description: str
    eval_description: str
    paragraphs: list[str] = field(default_factory=list)  # held-out paragraphs scored whole, from their first token


def base_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a base (`base.source`): a folder's, or the one inside a named source's GGUF file."""
    from transformers import AutoTokenizer

    from ..hub.sources import resolve_source

    folder, gguf_file = resolve_source(source)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def prepare_data(config: RecipeConfig, run_dir: Path) -> Data:
    """Tokenizer (trained once on the training split, kept in the run folder), packed train and held-out blocks."""
    spec = config.data
    splits = load_text_dataset(spec.source)
    if spec.tokenizer == "base":
        tokenizer = base_tokenizer(config.base.source)
    else:
        tokenizer = get_tokenizer(spec.tokenizer, vocab_size=spec.tokenizer_vocab_size,
                                  cache_dir=Path(run_dir) / "tokenizer")  # fmt: skip
    block = spec.block_size
    train = pack_dataset(splits["train"], tokenizer, block)
    if spec.train_blocks is not None and spec.train_blocks < len(train):
        train = train.shuffle(seed=config.seed).select(range(spec.train_blocks))
    held_out = pack_dataset(splits["validation"], tokenizer, block)
    unigram = unigram_baseline({"train": train, "validation": held_out}, len(tokenizer))
    n_tokens, n_bytes = count_tokens_and_bytes(splits["validation"]["text"], tokenizer)
    n_eval = len(held_out) if spec.eval_blocks is None else min(spec.eval_blocks, len(held_out))
    held_out = held_out.select(range(n_eval))
    paragraphs = list(splits["validation"]["text"][: spec.eval_paragraphs])
    described = "six Jane Austen novels (public domain), Persuasion held out" if spec.source == "austen" else spec.source
    if spec.train_blocks is not None:
        described += f", a random {len(train)} of the packed training blocks"
    return Data(
        tokenizer=tokenizer,
        train=train,
        eval=held_out,
        bytes_per_token=n_bytes / n_tokens,
        unigram_nats=unigram,
        description=f"{described}; {len(train)} blocks of {block} tokens ({len(train) * block:,} tokens)",
        eval_description=f"{n_eval} blocks of {block} tokens of the held-out split"
        + (f" and its first {len(paragraphs)} paragraphs, each from its first token" if paragraphs else ""),
        paragraphs=paragraphs,
    )


RECALL_EVAL_ROWS = 64  # held-out recall rows scored after every phase
RECALL_EVAL_SEED_OFFSET = 1_000_003  # their facts come from another stream than any training rows'
RECALL_WARMUP_SEED_OFFSET = 7_919  # warm-up rows come from another stream than the mixed-in rows'


def recall_vocabulary_of(tokenizer: PreTrainedTokenizerBase, limit: int | None, key: str = "phase1.recall_tokens"):
    """Key and value ids of recall rows: the tokenizer's first `limit` ordinary tokens (None: all; its special tokens
    come first), half keys, half values. `key` names the setting in the error."""
    first = max(tokenizer.all_special_ids, default=-1) + 1
    if limit is not None and not 4 <= limit <= len(tokenizer) - first:
        raise ValueError(f"{key}={limit!r} is invalid: allowed values are integers 4 .. {len(tokenizer) - first} "
                         "(the tokenizer's ordinary tokens) or null (all of them)")  # fmt: skip
    return recall_vocabulary(len(tokenizer) if limit is None else first + limit, first)


def held_out_recall_rows(config: RecipeConfig, tokenizer: PreTrainedTokenizerBase):
    """In-context recall rows no phase trains on (fresh facts, `phase1.recall_pairs` per episode), scored after every
    phase as `recall_accuracy`: can the model read a fact from its own context? Chance is 1 / pairs. Fewer pairs
    where a block is shorter than one episode (4 tokens a pair); None where not even one fits."""
    if not config.data.eval_recall:
        return None
    keys, values = recall_vocabulary_of(tokenizer, config.phase1.recall_tokens)
    block = config.data.block_size
    pairs = min(config.phase1.recall_pairs, block // 4, len(keys))  # one whole episode fits a block
    if pairs < 1:
        return None
    return recall_rows(RECALL_EVAL_ROWS, block, pairs, keys, values, seed=config.seed + RECALL_EVAL_SEED_OFFSET)


def phase1_data(config: RecipeConfig, data: Data) -> Data:
    """Phase 1's training data (after any recall warm-up): the packed blocks, with `phase1.recall_share` of the rows
    replaced by synthetic in-context recall rows (`phase1.recall_pairs` facts over single tokens), so the language
    model also learns to read a fact from its context, or keeps what the warm-up formed."""
    spec = config.phase1
    warmup = spec.recall_warmup
    if warmup is not None:  # the card says what the first stage trained on
        lr = warmup.training.get("learning_rate")
        rate = f" at lr {lr:g}" if lr else ""
        data = replace(data, description=f"{data.description}; first {warmup.steps} steps on recall rows only{rate}")
    if not spec.recall_share:
        return data
    keys, values = recall_vocabulary_of(data.tokenizer, spec.recall_tokens)
    train = mix_recall_rows(data.train, spec.recall_share, spec.recall_pairs, keys, values, seed=config.seed,
                            loss_on=spec.recall_loss_on)  # fmt: skip
    on = "" if spec.recall_loss_on == "all" else ", the loss on the answers"
    description = (f"{data.description}; {spec.recall_share:.0%} of the rows in-context recall "
                   f"({spec.recall_pairs} facts per episode{on})")  # fmt: skip
    return replace(data, train=train, description=description)


def recall_warmup_rows(config: RecipeConfig, tokenizer: PreTrainedTokenizerBase, n_rows: int):
    """The warm-up stage's rows: `n_rows` fresh recall rows (every step sees new facts) of
    `phase1.recall_warmup.length` tokens in the packed columns, over `phase1.recall_warmup.tokens` ids (default
    `phase1.recall_tokens`); with `loss_on: answers` every other label is -100 (no loss there)."""
    spec = config.phase1.recall_warmup
    tokens = spec.tokens if spec.tokens is not None else config.phase1.recall_tokens
    key = "phase1.recall_warmup.tokens" if spec.tokens is not None else "phase1.recall_tokens"
    keys, values = recall_vocabulary_of(tokenizer, tokens, key)
    rows = recall_rows(n_rows, config.recall_warmup_length(), config.phase1.recall_pairs, keys, values,
                       seed=config.seed + RECALL_WARMUP_SEED_OFFSET)  # fmt: skip
    if spec.loss_on == "answers":
        rows = answers_only(rows)
    return rows.remove_columns("answer_mask")


def conversation_script(config: RecipeConfig, data: Data) -> list[list[str]]:
    """Phase 4's scripted conversations: consecutive held-out paragraphs after the ones the evaluation scores, `turns`
    paragraphs (messages) per conversation, each cut to `max_message_words` words."""
    spec = config.phase4
    validation = load_text_dataset(config.data.source)["validation"]["text"]
    messages = [" ".join(text.split()[: spec.max_message_words]) for text in validation[len(data.paragraphs) :]
                if text.strip()]  # fmt: skip
    n, turns = spec.conversations, spec.turns
    if len(messages) < n * turns:
        raise ValueError(f"phase4.conversations={n} x turns={turns} needs {n * turns} held-out paragraphs; "
                         f"{len(messages)} remain after the scored ones")  # fmt: skip
    return [messages[i * turns : (i + 1) * turns] for i in range(n)]
