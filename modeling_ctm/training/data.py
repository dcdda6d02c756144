# Copyright 2025 The modeling_ctm authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Default training data for the CTM language model, and the pipeline that turns any text into LM blocks.

The package ships six Jane Austen novels (public domain, about 4 MB of plain text) so that a model can be trained
and evaluated with no download at all. The split is by *novel*, not by random paragraph, so validation text shares
an author and style with training text but no passages:

- train: Emma, Mansfield Park, Northanger Abbey, Pride and Prejudice, Sense and Sensibility
- validation: Persuasion (`HELD_OUT_NOVEL`)

Rows are paragraphs (blocks of text separated by blank lines, with their internal line breaks kept verbatim), with
a `novel` column naming the source. `pack_dataset` then tokenizes the rows, puts the tokenizer's EOS token after
every document and cuts the stream into fixed-size blocks for causal language modelling.

`load_text_dataset` gives user data (text files, a folder of `.txt` files, or a dataset saved with `save_to_disk`)
the same shape, so every training recipe can take a `source` argument. Nothing here touches the network.

`build_stages` gives a continual-learning run its stages (a caller's list, or one text cut into disjoint slices under
a token cipher each), every stage with its held-out tail and its licence.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Sequence,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


AUSTEN_RESOURCE = "resources/austen_6novels.txt.gz"

# Order matters: this is the order of the novels in the shipped file, and each title is the exact line that starts
# its novel. Persuasion's title is in title case, unlike the others.
AUSTEN_NOVEL_TITLES: dict[str, str] = {
    "emma": "EMMA",
    "mansfield_park": "MANSFIELD PARK",
    "northanger_abbey": "NORTHANGER ABBEY",
    "persuasion": "Persuasion",
    "pride_and_prejudice": "PRIDE AND PREJUDICE",
    "sense_and_sensibility": "SENSE AND SENSIBILITY",
}

HELD_OUT_NOVEL = "persuasion"
TRAINING_NOVELS: tuple[str, ...] = tuple(name for name in AUSTEN_NOVEL_TITLES if name != HELD_OUT_NOVEL)

DEFAULT_SOURCE = "austen"
_SOURCE_FORMS = (
    f"'{DEFAULT_SOURCE}' (the embedded Jane Austen novels), a path to a UTF-8 text file, a path to a directory of "
    "`.txt` files, or a path to a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`"
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")

# `int64` ids and labels so that `with_format("torch")` feeds embeddings and cross-entropy without a cast.
PACKED_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int64")),
        "attention_mask": Sequence(Value("int8")),
        "labels": Sequence(Value("int64")),
    }
)


@lru_cache(maxsize=1)
def read_austen_corpus() -> str:
    """Returns the full text of the shipped corpus (six novels, concatenated), decompressed from package data."""
    compressed = resources.files("modeling_ctm").joinpath(AUSTEN_RESOURCE).read_bytes()
    return gzip.decompress(compressed).decode("utf-8")


def load_austen_novels() -> dict[str, str]:
    """
    Splits the shipped corpus into its six novels.

    Returns:
        `dict[str, str]`: novel name (a key of `AUSTEN_NOVEL_TITLES`, in corpus order) to its text. Each text starts
        with the novel's title line and runs up to (not including) the next novel's title line, so the values
        concatenate back to exactly the shipped corpus.
    """
    corpus = read_austen_corpus()
    starts = []
    search_from = 0
    for name, title in AUSTEN_NOVEL_TITLES.items():
        # Whole-line match: titles such as "Persuasion" also occur inside running text.
        match = re.compile(rf"^{re.escape(title)}$", re.MULTILINE).search(corpus, search_from)
        if match is None:
            raise RuntimeError(f"The title line {title!r} of {name!r} was not found in {AUSTEN_RESOURCE}.")
        starts.append(match.start())
        search_from = match.end()
    if starts[0] != 0:
        raise RuntimeError(f"{AUSTEN_RESOURCE} has text before the first title line.")
    ends = starts[1:] + [len(corpus)]
    return {name: corpus[start:end] for name, start, end in zip(AUSTEN_NOVEL_TITLES, starts, ends)}


def split_paragraphs(text: str) -> list[str]:
    """Splits text at blank lines; paragraphs are stripped of surrounding whitespace and empty ones dropped."""
    return [paragraph.strip() for paragraph in _PARAGRAPH_BREAK.split(text) if paragraph.strip()]


def _novels_to_dataset(novels: dict[str, str], names: Iterable[str], granularity: str) -> Dataset:
    texts: list[str] = []
    novel_names: list[str] = []
    for name in names:
        documents = split_paragraphs(novels[name]) if granularity == "paragraph" else [novels[name]]
        texts.extend(documents)
        novel_names.extend([name] * len(documents))
    return Dataset.from_dict({"text": texts, "novel": novel_names})


def austen_splits(granularity: str = "paragraph") -> DatasetDict:
    """
    The embedded corpus as a `DatasetDict` with a "train" split (five novels) and a "validation" split
    (`HELD_OUT_NOVEL`, Persuasion). There is no separate test split: the held-out novel serves as both.

    Args:
        granularity (`str`, *optional*, defaults to `"paragraph"`):
            `"paragraph"` gives one row per paragraph (about 10k rows in all; see `split_paragraphs`), which keeps
            rows short enough to shuffle and to tokenize in parallel. `"novel"` gives one row per novel, verbatim.

    Returns:
        `DatasetDict`: columns `text` (the document) and `novel` (its source, a key of `AUSTEN_NOVEL_TITLES`).
    """
    if granularity not in ("paragraph", "novel"):
        raise ValueError(f"`granularity` must be 'paragraph' or 'novel', got {granularity!r}.")
    novels = load_austen_novels()
    return DatasetDict(
        {
            "train": _novels_to_dataset(novels, TRAINING_NOVELS, granularity),
            "validation": _novels_to_dataset(novels, [HELD_OUT_NOVEL], granularity),
        }
    )


def austen_training_texts() -> list[str]:
    """The paragraphs of the training novels only: what a tokenizer may be fitted on without seeing validation text."""
    novels = load_austen_novels()
    return [paragraph for name in TRAINING_NOVELS for paragraph in split_paragraphs(novels[name])]


def _tokenize_and_pack(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, block_size: int, text_column: str
) -> dict[str, np.ndarray]:
    # verbose=False: documents longer than `model_max_length` are expected here, packing cuts them into blocks.
    token_ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    # EOS after every document, so consecutive documents in a block are always separated by exactly one EOS.
    pieces = [array for ids in token_ids for array in (np.asarray(ids, dtype=np.int64), eos)]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    num_blocks = len(stream) // block_size
    blocks = stream[: num_blocks * block_size].reshape(num_blocks, block_size)
    return {
        "input_ids": blocks,
        "attention_mask": np.ones_like(blocks, dtype=np.int8),
        # Unshifted, like every transformers causal LM: the model shifts labels itself.
        "labels": blocks.copy(),
    }


def pack_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> Dataset:
    """
    Tokenizes documents and packs them into blocks of exactly `block_size` tokens for causal language modelling.

    Every document is followed by `tokenizer.eos_token`, then the token stream is cut into blocks. As in
    transformers' `run_clm.py` example, packing happens per `datasets.map` batch: each batch of `batch_size`
    documents drops its own leftover tail of fewer than `block_size` tokens (a fraction of about
    `block_size / tokens_per_batch` of the data), which keeps the pipeline streaming and parallel.

    Args:
        dataset (`Dataset`): documents, one per row.
        tokenizer (`PreTrainedTokenizerBase`): a tokenizer with an `eos_token`.
        block_size (`int`): tokens per block.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the documents.
        num_proc (`int`, *optional*): worker processes for `datasets.map`.
        batch_size (`int`, *optional*, defaults to 1000): documents packed together; larger wastes fewer tokens.

    Returns:
        `Dataset`: columns `input_ids`, `attention_mask` (all ones, as blocks hold no padding) and `labels`
        (equal to `input_ids`); every other column is dropped.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
    if text_column not in dataset.column_names:
        raise ValueError(
            f"`text_column` must be one of the dataset's columns {dataset.column_names}, got {text_column!r}."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("`tokenizer` must define an `eos_token`: it separates documents in the packed stream.")
    return dataset.map(
        _tokenize_and_pack,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        features=PACKED_FEATURES,
        fn_kwargs={"tokenizer": tokenizer, "block_size": block_size, "text_column": text_column},
        desc=f"Packing into blocks of {block_size} tokens",
    )


def _is_saved_dataset(path: Path) -> bool:
    # Markers written by `DatasetDict.save_to_disk` and `Dataset.save_to_disk` respectively.
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _clean_paragraphs(dataset: Dataset) -> Dataset:
    # The "text" builder splits on "\n\n" exactly, so runs of blank lines leave empty or newline-led rows.
    dataset = dataset.map(
        lambda batch: {"text": [text.strip() for text in batch["text"]]}, batched=True, desc="Stripping paragraphs"
    )
    return dataset.filter(lambda batch: [bool(text) for text in batch["text"]], batched=True, desc="Dropping empty")


def _train_validation_split(dataset: Dataset, validation_fraction: float, seed: int) -> DatasetDict:
    if len(dataset) < 2:
        raise ValueError(f"`source` must provide at least two documents to split, got {len(dataset)}.")
    split = dataset.train_test_split(test_size=validation_fraction, seed=seed, shuffle=True)
    return DatasetDict({"train": split["train"], "validation": split["test"]})


def load_text_dataset(
    source: str | Path = DEFAULT_SOURCE,
    validation_fraction: float = 0.05,
    seed: int = 0,
    text_column: str = "text",
    cache_dir: str | None = None,
) -> DatasetDict:
    """
    Loads training text from the embedded corpus or from local files, as a `DatasetDict` with "train" and
    "validation" splits. Only local paths are accepted: the Hugging Face Hub is never contacted.

    Args:
        source (`str` or `Path`, *optional*, defaults to `"austen"`): one of
            - `"austen"`: the embedded novels, split by novel (see `austen_splits`);
            - a UTF-8 text file, or a directory of `.txt` files (read in sorted order): one row per paragraph
              (text between blank lines), then a seeded random train/validation split;
            - a directory written by `Dataset.save_to_disk` (split like text files) or `DatasetDict.save_to_disk`
              (its "validation" split is used if present, else its "train" split is split like text files).
        validation_fraction (`float`, *optional*, defaults to 0.05):
            share of rows held out when `source` has no validation split of its own; in (0, 1).
        seed (`int`, *optional*, defaults to 0): seed of that split, so it is the same on every call.
        text_column (`str`, *optional*, defaults to `"text"`):
            the column holding the text in a saved dataset. The returned splits always name it `text_column`
            (rows from the corpus or from text files are renamed to it), so it can be passed on to `pack_dataset`.
        cache_dir (`str`, *optional*): where `datasets` caches the Arrow files built from text files.

    Returns:
        `DatasetDict` with "train" and "validation" splits.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be strictly between 0 and 1, got {validation_fraction!r}.")

    path = Path(source).expanduser()
    if isinstance(source, str) and source == DEFAULT_SOURCE:
        splits = austen_splits()
    elif path.is_dir() and _is_saved_dataset(path):
        # Already has its own column names: nothing to rename.
        return _load_saved_dataset(path, validation_fraction, seed, text_column)
    elif path.is_file():
        splits = _load_text_files([path], validation_fraction, seed, cache_dir)
    elif path.is_dir() and any(path.glob("*.txt")):
        splits = _load_text_files(sorted(path.glob("*.txt")), validation_fraction, seed, cache_dir)
    else:
        raise ValueError(f"`source` must be {_SOURCE_FORMS}; got {str(source)!r}, which is none of these.")

    if text_column != "text":
        splits = splits.rename_column("text", text_column)
    return splits


def _load_text_files(files: list[Path], validation_fraction: float, seed: int, cache_dir: str | None) -> DatasetDict:
    dataset = load_dataset(
        "text",
        data_files={"train": [str(file) for file in files]},
        sample_by="paragraph",
        split="train",
        cache_dir=cache_dir,
    )
    return _train_validation_split(_clean_paragraphs(dataset), validation_fraction, seed)


def _load_saved_dataset(path: Path, validation_fraction: float, seed: int, text_column: str) -> DatasetDict:
    saved = load_from_disk(str(path))
    if isinstance(saved, Dataset):
        splits = _train_validation_split(saved, validation_fraction, seed)
    elif "train" not in saved:
        raise ValueError(f"`source` {str(path)!r} holds splits {list(saved)}; it must have a 'train' split.")
    elif "validation" in saved:
        splits = DatasetDict({"train": saved["train"], "validation": saved["validation"]})
    else:
        splits = _train_validation_split(saved["train"], validation_fraction, seed)
    for name, split in splits.items():
        if text_column not in split.column_names:
            raise ValueError(
                f"`text_column` must name a column of the {name!r} split of {str(path)!r} "
                f"(columns: {split.column_names}), got {text_column!r}."
            )
    return splits


def _flat_token_ids(blocks: Dataset, column: str) -> np.ndarray:
    return np.asarray(blocks.with_format("numpy")[:][column], dtype=np.int64).reshape(len(blocks), -1)


def unigram_baseline(packed: DatasetDict, vocab_size: int, column: str = "input_ids") -> float:
    """
    Cross-entropy, in nats per token, of a unigram model on the validation blocks: the loss a language model must
    beat to show it has learned anything beyond token frequencies.

    The unigram distribution is fitted on the token counts of the "train" blocks with add-one (Laplace) smoothing
    over all `vocab_size` ids, so every id has nonzero probability. It is scored on the same positions a causal LM
    is scored on: every token of each "validation" block except the first, which the model never predicts.

    Args:
        packed (`DatasetDict`): the output of `pack_dataset` on "train" and "validation" splits.
        vocab_size (`int`): number of token ids, usually `len(tokenizer)`; every id must be below it.
        column (`str`, *optional*, defaults to `"input_ids"`): the column of token ids.

    Returns:
        `float`: mean negative log-likelihood in nats per token.
    """
    for split in ("train", "validation"):
        if split not in packed or len(packed[split]) == 0:
            raise ValueError(f"`packed` must have a non-empty {split!r} split, got splits {list(packed)}.")
    train_ids = _flat_token_ids(packed["train"], column)
    validation_ids = _flat_token_ids(packed["validation"], column)
    largest_id = max(int(train_ids.max()), int(validation_ids.max()))
    if largest_id >= vocab_size:
        raise ValueError(f"`vocab_size` must exceed every token id, got {vocab_size} but found id {largest_id}.")
    validation_ids = validation_ids[:, 1:]
    counts = np.bincount(train_ids.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts) - np.log(counts.sum())
    validation_counts = np.bincount(validation_ids.ravel(), minlength=vocab_size)
    return float(-(validation_counts @ log_probs) / validation_counts.sum())


def count_tokens_and_bytes(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, add_eos: bool = True, batch_size: int = 1000
) -> tuple[int, int]:
    """
    Counts the tokens and UTF-8 bytes of documents, for converting a per-token loss into bits per byte.

    Args:
        texts (`Iterable[str]`): the documents.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        add_eos (`bool`, *optional*, defaults to `True`):
            count one EOS token per document, as `pack_dataset` inserts one and the model is scored on it.
        batch_size (`int`, *optional*, defaults to 1000): documents tokenized per call.

    Returns:
        `tuple[int, int]`: `(n_tokens, n_bytes)`.
    """
    n_tokens = 0
    n_bytes = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens, n_bytes
        lengths = tokenizer(batch, add_special_tokens=False, return_length=True, verbose=False)["length"]
        n_tokens += int(np.sum(lengths)) + (len(batch) if add_eos else 0)
        n_bytes += sum(len(text.encode("utf-8")) for text in batch)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return n_tokens, n_bytes


def bytes_per_token(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, add_eos: bool = True) -> float:
    """UTF-8 bytes per token of `texts` under `tokenizer` (see `count_tokens_and_bytes` for `add_eos`)."""
    n_tokens, n_bytes = count_tokens_and_bytes(texts, tokenizer, add_eos=add_eos)
    if n_tokens == 0:
        raise ValueError("`texts` must contain at least one token.")
    return n_bytes / n_tokens


def bits_per_byte(mean_nll_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """
    Converts a mean loss in nats per token into bits per byte, which compares across tokenizers:
    `bits_per_byte = mean_nll_nats_per_token * n_tokens / (n_bytes * ln 2)`.

    Args:
        mean_nll_nats_per_token (`float`): mean negative log-likelihood (the usual LM loss).
        n_tokens (`int`): tokens the text was split into (see `count_tokens_and_bytes`).
        n_bytes (`int`): UTF-8 bytes of the same text.
    """
    if n_tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"`n_tokens` and `n_bytes` must be positive, got n_tokens={n_tokens}, n_bytes={n_bytes}.")
    return mean_nll_nats_per_token * n_tokens / (n_bytes * math.log(2))


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic in-context recall rows (multi-query associative recall, MQAR)
# ----------------------------------------------------------------------------------------------------------------------


def recall_vocabulary(vocab_size: int, first_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint key and value ids for recall rows: ids `first_id .. vocab_size - 1` split into two halves (keys
    first). `first_id` skips reserved ids (a tokenizer's special tokens usually come first)."""
    ids = np.arange(first_id, vocab_size, dtype=np.int64)
    if len(ids) < 4:
        raise ValueError(f"recall rows need >= 4 usable ids, got ids {first_id} .. {vocab_size - 1}")
    return ids[: len(ids) // 2], ids[len(ids) // 2 :]


def recall_rows(
    n_rows: int, length: int, n_pairs: int, key_ids: np.ndarray, value_ids: np.ndarray, seed: int
) -> Dataset:
    """Rows of multi-query associative recall (MQAR), the skill an induction head gives: read a fact from context.

    One episode is `2 * n_pairs` tokens of facts, `k_1 v_1 ... k_n v_n` (n distinct keys from `key_ids`, each with a
    value drawn from `value_ids`), then the same n keys asked in a random order, each followed by its value:
    `k_p(1) v_p(1) ... k_p(n) v_p(n)`. Episodes follow each other until the row holds `length` tokens (the last one
    cut there); the episodes of a row use distinct keys when there are enough key ids. Chance of naming an answer from the facts alone is 1 / n_pairs.

    Returns a `Dataset` in the packed shape (`input_ids`, `attention_mask` all ones, `labels` = `input_ids`: the loss
    covers every token, as in a data mixture) plus `answer_mask`, 1 at the value of every query, the positions where
    recall is scored (the model predicts position t from t - 1, so score the logits of position t - 1 there).
    """
    if n_pairs < 1 or n_pairs > len(key_ids):
        raise ValueError(f"n_pairs={n_pairs} is invalid: allowed are 1 .. {len(key_ids)} (the number of key ids)")
    if len(np.intersect1d(key_ids, value_ids)):
        raise ValueError("key_ids and value_ids must be disjoint, or a value could be read as a key")
    rng = np.random.default_rng(seed)
    episode = 4 * n_pairs
    repeats = -(-length // episode)
    input_ids = np.empty((n_rows, repeats * episode), dtype=np.int64)
    answer_mask = np.zeros_like(input_ids, dtype=np.int8)
    # a key told twice in one row with two values makes the lookup ambiguous (and, measured, stops a tiny model from
    # learning it at all), so a row's episodes use distinct keys while the key ids suffice
    distinct = n_pairs * repeats <= len(key_ids)
    for row in range(n_rows):
        row_keys = rng.choice(key_ids, size=n_pairs * repeats, replace=False).reshape(repeats, n_pairs) if distinct else None
        for e in range(repeats):
            keys = row_keys[e] if distinct else rng.choice(key_ids, size=n_pairs, replace=False)
            values = rng.choice(value_ids, size=n_pairs)
            order = rng.permutation(n_pairs)
            start = e * episode
            facts = np.stack([keys, values], axis=1).reshape(-1)
            queries = np.stack([keys[order], values[order]], axis=1).reshape(-1)
            input_ids[row, start : start + episode] = np.concatenate([facts, queries])
            answer_mask[row, start + 2 * n_pairs + 1 : start + episode : 2] = 1
    input_ids, answer_mask = input_ids[:, :length], answer_mask[:, :length]
    return Dataset.from_dict(
        {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids, dtype=np.int8),
            "labels": input_ids.copy(),
            "answer_mask": answer_mask,
        },
        features=Features({**PACKED_FEATURES, "answer_mask": Sequence(Value("int8"))}),
    )


RECALL_LOSS_ON = ("all", "answers")


def answers_only(rows: Dataset) -> Dataset:
    """Recall rows with the loss on the queried values only (every other label -100): no gradient goes to predicting
    the random facts, whose loss (~ln of the ids) would otherwise dominate a row."""

    def labels(batch: dict[str, list]) -> dict[str, list]:
        return {"labels": [[token if answer else -100 for token, answer in zip(ids, mask)]
                           for ids, mask in zip(batch["input_ids"], batch["answer_mask"])]}  # fmt: skip

    return rows.map(labels, batched=True, desc="Recall labels on the answers")


def mix_recall_rows(
    blocks: Dataset, share: float, n_pairs: int, key_ids, value_ids, seed: int, loss_on: str = "all"
) -> Dataset:
    """`blocks` (packed LM blocks) with recall rows of the same length mixed in, shuffled with `seed`: recall rows are
    `share` of the result's rows (rounded; `share=0` returns `blocks` as they are), their loss on every token
    (`loss_on="all"`, as in a data mixture) or on the queried values only (`"answers"`). `answer_mask` is dropped, so
    the mixture has the packed columns only."""
    if not 0 <= share < 1:
        raise ValueError(f"recall share={share!r} is invalid: allowed are numbers in [0, 1)")
    if loss_on not in RECALL_LOSS_ON:
        raise ValueError(f"recall loss_on={loss_on!r} is invalid: allowed values are {list(RECALL_LOSS_ON)}")
    n_recall = round(share * len(blocks) / (1 - share))
    if n_recall == 0:
        return blocks
    length = len(blocks[0]["input_ids"])
    recall = recall_rows(n_recall, length, n_pairs, key_ids, value_ids, seed)
    recall = (answers_only(recall) if loss_on == "answers" else recall).remove_columns("answer_mask")
    mixed = concatenate_datasets([blocks.cast(PACKED_FEATURES), recall.cast(PACKED_FEATURES)])
    return mixed.shuffle(seed=seed).flatten_indices()


# the continual-learning stages live in `training.stages`; their names stay importable from here
from .stages import AUSTEN_LICENCE, Stage, build_stages, cipher_permutation  # noqa: E402, F401
