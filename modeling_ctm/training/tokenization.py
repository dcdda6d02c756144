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
"""Byte-level BPE tokenizers for the CTM language model, trained locally in about a second.

The tokenizer is GPT-2 style byte-level BPE built with the `tokenizers` library and wrapped in a
`PreTrainedTokenizerFast`, so it saves with `save_pretrained` and reloads with `AutoTokenizer.from_pretrained`.
Working on bytes means there is no unknown token: any Unicode string round-trips through encode and decode.

Special tokens: `<|endoftext|>` (id 0) is both BOS and EOS and separates documents in packed training blocks;
`<|pad|>` (id 1) pads batches. Neither is added by `tokenizer(text)`: the data pipeline inserts EOS itself.

The default tokenizer is trained on the five training novels of the embedded corpus only, so no validation text
(the held-out novel) leaks into the vocabulary.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .data import DEFAULT_SOURCE, austen_training_texts, load_text_dataset


END_OF_TEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT_TOKEN, PAD_TOKEN]
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MODEL_MAX_LENGTH = 2048
_BYTE_ALPHABET_SIZE = 256


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """
    Trains a byte-level BPE tokenizer.

    Args:
        texts (`Iterable[str]` or `Iterable[list[str]]`): training documents, one by one or in batches.
        vocab_size (`int`, *optional*, defaults to 4096):
            final vocabulary size including the 256 byte tokens and the 2 special tokens. The result can be
            smaller if the text holds too few merges that occur `min_frequency` times.
        min_frequency (`int`, *optional*, defaults to 2): a pair must occur this often to be merged.
        model_max_length (`int`, *optional*, defaults to 2048): the tokenizer's declared maximum length.

    Returns:
        `PreTrainedTokenizerFast`
    """
    smallest = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(
            f"`vocab_size` must be an integer of at least {smallest} (bytes + special tokens), got {vocab_size!r}."
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"`min_frequency` must be a positive integer, got {min_frequency!r}.")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets covering the leading space that byte-level tokens carry.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # All 256 bytes up front, so characters unseen in training still encode (as bytes), never as <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT_TOKEN,
        eos_token=END_OF_TEXT_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        # The cleanup would rewrite " ," as "," and break the decode(encode(s)) == s round trip.
        clean_up_tokenization_spaces=False,
    )


def train_austen_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Trains the default tokenizer on the paragraphs of the five training novels (never the held-out one)."""
    return train_tokenizer(austen_training_texts(), vocab_size=vocab_size, min_frequency=min_frequency)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Loads a tokenizer saved with `save_pretrained` from a local folder; the Hub is never contacted."""
    folder = Path(folder).expanduser()
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(
            f"`path` must be a folder written by `tokenizer.save_pretrained` (with a tokenizer_config.json), "
            f"got {str(folder)!r}."
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def get_tokenizer(
    path: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """
    Returns the tokenizer to train with: a saved one if `path` is given, otherwise the Austen tokenizer.

    Args:
        path (`str` or `Path`, *optional*): a folder written by `save_pretrained`.
        vocab_size (`int`, *optional*, defaults to 4096): vocabulary size of the Austen tokenizer; ignored with `path`.
        cache_dir (`str` or `Path`, *optional*):
            where to keep the Austen tokenizer (in a `austen-bpe-{vocab_size}` subfolder), so it is trained once and
            reloaded afterwards. Without it, the tokenizer is trained on every call (about a second).
    """
    if path is not None:
        return load_tokenizer(path)
    if cache_dir is None:
        return train_austen_tokenizer(vocab_size)
    cached = Path(cache_dir).expanduser() / f"austen-bpe-{vocab_size}"
    if (cached / "tokenizer_config.json").is_file():
        return load_tokenizer(cached)
    tokenizer = train_austen_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(cached))
    return tokenizer


def _batched_texts(source: str, text_column: str = "text", batch_size: int = 1000) -> Iterator[list[str]]:
    train = load_text_dataset(source, text_column=text_column)["train"]
    for batch in train.iter(batch_size=batch_size):
        yield batch[text_column]


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of `ctm tokenizer` to `parser` (a top-level parser or a subcommand's)."""
    parser.add_argument("--output", required=True, type=Path, help="Folder to save the tokenizer to.")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="Vocabulary size, bytes and special tokens included.",
    )
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="Minimum number of occurrences for a pair to be merged."
    )
    parser.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=(
            f"'{DEFAULT_SOURCE}' (the embedded novels, training split only), a text file, a directory of .txt "
            "files, or a dataset saved with save_to_disk. Only the training split is used."
        ),
    )
    parser.add_argument("--text-column", default="text", help="Column holding the text in a saved dataset.")
    return parser


def run_tokenizer_command(args: argparse.Namespace) -> int:
    """Trains a tokenizer as `args` (from `add_tokenizer_arguments`) describe and saves it; returns an exit code."""
    started = time.perf_counter()
    if args.source == DEFAULT_SOURCE:
        tokenizer = train_austen_tokenizer(args.vocab_size, min_frequency=args.min_frequency)
    else:
        tokenizer = train_tokenizer(
            _batched_texts(args.source, text_column=args.text_column),
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
        )
    elapsed = time.perf_counter() - started
    tokenizer.save_pretrained(str(args.output))
    print(
        f"Trained a {len(tokenizer)}-token byte-level BPE on {args.source!r} in {elapsed:.1f}s; saved to {args.output}"
    )
    return 0


def main_train_tokenizer(argv: list[str] | None = None) -> int:
    """Entry point: `python -m modeling_ctm.training.tokenization --output DIR [--vocab-size N] [--source austen|PATH]`."""
    parser = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer and save it with save_pretrained.")
    add_tokenizer_arguments(parser)
    return run_tokenizer_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main_train_tokenizer())
