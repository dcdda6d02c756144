"""Sequential stages for continual learning: the one place a stage list is built, ours (one text cut into slices,
later slices under a token cipher) or a user's (several sources), each stage with a disjoint held-out tail."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from datasets import Dataset


AUSTEN_LICENCE = "public domain (Jane Austen's novels, plain text as shipped in this package)"


@dataclass
class Stage:
    """One stage of a sequence learned in turn: packed `train` and `held_out` blocks (disjoint from each other and from
    every other stage's), the licence of its text, and the token cipher applied to it (`None`: the text as it is;
    otherwise `cipher[i]` is the id that replaced id `i`)."""

    name: str
    train: Dataset
    held_out: Dataset
    licence: str
    cipher: np.ndarray | None = None


def cipher_permutation(vocab_size: int, seed: int, keep_ids: Iterable[int] = ()) -> np.ndarray:
    """A fixed random permutation of the ids `0 .. vocab_size - 1` (seeded), leaving `keep_ids` (special tokens such
    as EOS and padding) where they are. Text under it keeps every statistic of the text, relabelled: a stage that
    interferes with the plain text as much as a stage can, at the same difficulty."""
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"cipher vocab_size={vocab_size!r} is invalid: allowed values are integers >= 2")
    keep = sorted({int(i) for i in keep_ids})
    if any(not 0 <= i < vocab_size for i in keep):
        raise ValueError(f"cipher keep_ids={keep} is invalid: allowed values are ids in 0 .. {vocab_size - 1}")
    moving = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(keep, dtype=np.int64))
    permutation = np.arange(vocab_size, dtype=np.int64)
    permutation[moving] = np.random.default_rng(seed).permutation(moving)
    return permutation


def _apply_cipher(batch: dict[str, list], permutation: np.ndarray) -> dict[str, list]:
    out = {}
    for column in ("input_ids", "labels"):
        rows = [np.asarray(row, dtype=np.int64) for row in batch[column]]
        # -100 (an unlabelled position) is not an id: it stays as it is
        out[column] = [np.where(row >= 0, permutation[np.clip(row, 0, None)], row) for row in rows]
    return out


def _row_keys(blocks: Dataset) -> list[bytes]:
    return [np.asarray(row, dtype=np.int64).tobytes() for row in blocks["input_ids"]]


def build_stages(
    stages: Mapping[str, Dataset] | Dataset,
    held_out_blocks: int,
    licences: Mapping[str, str] | str,
    n_stages: int | None = None,
    cipher: bool = False,
    vocab_size: int | None = None,
    keep_ids: Iterable[int] = (),
    seed: int = 0,
) -> list[Stage]:
    """
    The stages of a continual-learning run, in order, each with its held-out tail.

    Either the caller's own stage list (`stages`: stage name -> packed blocks, e.g. one `pack_dataset` per source),
    or one packed `Dataset` cut into `n_stages` contiguous, disjoint slices named `stage0`, `stage1`, ... With
    `cipher=True`, stage 0 stays the text as it is and stage i > 0 is its slice under `cipher_permutation(vocab_size,
    seed * 1000 + i, keep_ids)`: the same kind of text, every token relabelled, so learning a later stage overwrites
    what ids meant before (forgetting measurable at tiny scale).

    Args:
        stages: the stages' packed blocks (`input_ids`, `attention_mask`, `labels`), or one packed `Dataset`.
        held_out_blocks (`int`): the last blocks of every stage kept out of training, for scoring.
        licences: each stage's licence (name -> text, or one text for all stages); required, never empty: a stage
            list says what may be shipped or published from it.
        n_stages, cipher, vocab_size, keep_ids, seed: see above (`n_stages` only with one `Dataset`).

    Returns:
        `list[Stage]`. Raises `ValueError` when a block occurs in two stages or in a stage's train and held-out part
        (compared before any cipher), when a stage has fewer than `held_out_blocks + 1` blocks, or a licence is
        missing.
    """
    if isinstance(stages, Dataset):
        if not isinstance(n_stages, int) or n_stages < 1:
            raise ValueError(f"n_stages={n_stages!r} is invalid: allowed values are integers >= 1 (one Dataset is cut)")
        size = len(stages) // n_stages
        stages = {f"stage{i}": stages.select(range(i * size, (i + 1) * size)) for i in range(n_stages)}
    elif n_stages is not None:
        raise ValueError("n_stages is only for one Dataset cut into slices; a stage mapping already names its stages")
    if not stages:
        raise ValueError("build_stages needs at least one stage")
    if not isinstance(held_out_blocks, int) or held_out_blocks < 1:
        raise ValueError(f"held_out_blocks={held_out_blocks!r} is invalid: allowed values are integers >= 1")
    if isinstance(licences, str):
        licences = dict.fromkeys(stages, licences)
    missing = [name for name in stages if not str(licences.get(name, "")).strip()]
    if missing:
        raise ValueError(f"stages {missing} have no licence: give licences a non-empty text for every stage")
    if cipher and (not isinstance(vocab_size, int) or vocab_size < 2):
        raise ValueError(f"vocab_size={vocab_size!r} is invalid with cipher=True: allowed values are integers >= 2")
    owner: dict[bytes, tuple[str, str]] = {}
    built = []
    for index, (name, blocks) in enumerate(stages.items()):
        if len(blocks) <= held_out_blocks:
            raise ValueError(f"stage {name!r} has {len(blocks)} blocks: it needs more than held_out_blocks={held_out_blocks}")
        split = len(blocks) - held_out_blocks
        for row, key in enumerate(_row_keys(blocks)):
            place = (name, "train" if row < split else "held_out")
            if owner.setdefault(key, place) != place:  # a repeat inside one part is harmless, across parts it leaks
                raise ValueError(f"a block of stage {name!r} ({place[1]}) also occurs in stage {owner[key][0]!r} "
                                 f"({owner[key][1]}): stages and their held-out parts must be disjoint")  # fmt: skip
        permutation = cipher_permutation(vocab_size, seed * 1000 + index, keep_ids) if cipher and index else None
        if permutation is not None:
            blocks = blocks.map(_apply_cipher, batched=True, fn_kwargs={"permutation": permutation},
                                desc=f"Cipher of {name}")  # fmt: skip
        built.append(Stage(name, blocks.select(range(split)), blocks.select(range(split, len(blocks))), licences[name],
                           permutation))  # fmt: skip
    return built
