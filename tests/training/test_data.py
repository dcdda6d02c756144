"""Tests for the embedded Austen corpus, the block-packing pipeline, local data sources and the BPE tokenizer."""

from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from modeling_ctm.training.data import (
    AUSTEN_NOVEL_TITLES,
    HELD_OUT_NOVEL,
    TRAINING_NOVELS,
    austen_splits,
    austen_training_texts,
    bits_per_byte,
    bytes_per_token,
    count_tokens_and_bytes,
    load_austen_novels,
    load_text_dataset,
    pack_dataset,
    read_austen_corpus,
    unigram_baseline,
)
from modeling_ctm.training.tokenization import (
    add_tokenizer_arguments,
    get_tokenizer,
    main_train_tokenizer,
    run_tokenizer_command,
    train_tokenizer,
)


# A small vocabulary keeps training well under a second while still learning real merges.
SMALL_VOCAB = 512

# Opening sentences of each novel's first chapter: they pin each boundary to the right novel.
FIRST_CHAPTER_OPENINGS = {
    "emma": "Emma Woodhouse, handsome, clever, and rich",
    "mansfield_park": "About thirty years ago Miss Maria Ward",
    "northanger_abbey": "No one who had ever seen Catherine Morland",
    "persuasion": "Sir Walter Elliot, of Kellynch Hall",
    "pride_and_prejudice": "It is a truth universally acknowledged",
    "sense_and_sensibility": "The family of Dashwood had long been settled in Sussex",
}

UNICODE_SAMPLES = [
    "Héloïse naïve café — déjà vu, Ångström, straße",
    "emoji 🎉🧠👩‍👩‍👧 and CJK 日本語 and Ελληνικά",
    "line one\nline two\n\n\nafter blank lines\r\nwindows\ttab",
    "  leading spaces , spaced punctuation . don 't",
    "",
]


def _strip_whitespace(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def austen_tokenizer():
    return train_tokenizer(austen_training_texts(), vocab_size=SMALL_VOCAB)


@pytest.fixture(scope="module")
def austen_novels():
    return load_austen_novels()


def test_six_novels_each_start_with_their_own_title(austen_novels):
    assert list(austen_novels) == list(AUSTEN_NOVEL_TITLES)
    all_titles = set(AUSTEN_NOVEL_TITLES.values())
    for name, text in austen_novels.items():
        lines = text.splitlines()
        assert lines[0] == AUSTEN_NOVEL_TITLES[name]
        # No other novel's title line (hence no start of the next novel) inside this one.
        assert [line for line in lines if line in all_titles] == [AUSTEN_NOVEL_TITLES[name]]
        assert FIRST_CHAPTER_OPENINGS[name] in text
        for other, opening in FIRST_CHAPTER_OPENINGS.items():
            if other != name:
                assert opening not in text, f"{name} contains the opening of {other}"


def test_novels_account_for_the_whole_corpus(austen_novels):
    assert "".join(austen_novels.values()) == read_austen_corpus()
    # Persuasion ends its own way: it must not swallow Pride and Prejudice, nor lose its last word.
    assert austen_novels["persuasion"].rstrip().endswith("Finis")
    assert austen_novels["northanger_abbey"].rstrip().endswith("modern British usage.")


def test_austen_splits_hold_out_persuasion(austen_novels):
    splits = austen_splits()
    assert set(splits) == {"train", "validation"}
    assert set(splits["validation"]["novel"]) == {HELD_OUT_NOVEL}
    assert set(splits["train"]["novel"]) == set(TRAINING_NOVELS)
    assert HELD_OUT_NOVEL not in TRAINING_NOVELS
    assert not any("Kellynch" in text for text in splits["train"]["text"])
    assert all(text == text.strip() and text for split in splits.values() for text in split["text"])

    # Paragraphs lose only whitespace: per novel they rebuild the novel exactly, modulo whitespace.
    for split in splits.values():
        texts = np.array(split["text"], dtype=object)
        novel_of_row = np.array(split["novel"])
        for name in set(split["novel"]):
            rebuilt = "".join(texts[novel_of_row == name])
            assert _strip_whitespace(rebuilt) == _strip_whitespace(austen_novels[name])


def test_austen_splits_by_novel():
    splits = austen_splits(granularity="novel")
    assert splits["train"]["novel"] == list(TRAINING_NOVELS)
    assert splits["validation"]["novel"] == [HELD_OUT_NOVEL]
    with pytest.raises(ValueError, match="`granularity` must be 'paragraph' or 'novel'"):
        austen_splits(granularity="chapter")


def test_austen_training_texts_exclude_held_out_novel():
    texts = austen_training_texts()
    assert texts == austen_splits()["train"]["text"]
    assert not any(FIRST_CHAPTER_OPENINGS[HELD_OUT_NOVEL] in text for text in texts)


def test_pack_dataset_blocks_and_eos_between_documents(austen_tokenizer):
    documents = [f"Document {index}: " + "Miss Bennet walked to Netherfield. " * (index % 5) for index in range(40)]
    block_size = 7
    dataset = Dataset.from_dict({"text": documents, "extra": list(range(40))})
    packed = pack_dataset(dataset, austen_tokenizer, block_size)

    assert packed.column_names == ["input_ids", "attention_mask", "labels"]
    blocks = np.array(packed["input_ids"])
    assert blocks.shape[1] == block_size
    assert np.array_equal(np.array(packed["labels"]), blocks)
    assert np.array(packed["attention_mask"]).min() == 1

    eos = austen_tokenizer.eos_token_id
    expected_stream = []
    for document in documents:
        expected_stream += austen_tokenizer(document, add_special_tokens=False)["input_ids"] + [eos]
    # All 40 documents fit one map batch, so only the final tail (< block_size) is dropped.
    assert len(expected_stream) - blocks.size < block_size
    assert blocks.ravel().tolist() == expected_stream[: blocks.size]
    eos_positions = np.flatnonzero(blocks.ravel() == eos)
    assert len(eos_positions) in (len(documents), len(documents) - 1)
    assert austen_tokenizer.decode(blocks.ravel()[: eos_positions[0]]) == documents[0]


def test_pack_dataset_drops_tail_per_batch_and_rejects_bad_input(austen_tokenizer):
    documents = Dataset.from_dict({"text": ["one two three four five six seven eight nine ten"] * 12})
    tokens_per_document = len(austen_tokenizer(documents[0]["text"])["input_ids"]) + 1
    block_size = tokens_per_document + 1
    packed = pack_dataset(documents, austen_tokenizer, block_size, batch_size=4)
    # 3 batches of 4 documents; each batch packs floor(4 * tokens_per_document / block_size) blocks.
    assert len(packed) == 3 * ((4 * tokens_per_document) // block_size)

    with pytest.raises(ValueError, match="`block_size` must be a positive integer"):
        pack_dataset(documents, austen_tokenizer, 0)
    with pytest.raises(ValueError, match="`text_column` must be one of"):
        pack_dataset(documents, austen_tokenizer, 8, text_column="content")


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_any_unicode(austen_tokenizer, text):
    ids = austen_tokenizer(text)["input_ids"]
    assert austen_tokenizer.decode(ids) == text
    assert austen_tokenizer.eos_token_id not in ids  # EOS is the data pipeline's job, not the tokenizer's


def test_tokenizer_special_tokens_and_compression(austen_tokenizer):
    assert len(austen_tokenizer) == SMALL_VOCAB
    assert austen_tokenizer.unk_token is None
    assert austen_tokenizer.eos_token == austen_tokenizer.bos_token == "<|endoftext|>"
    assert (austen_tokenizer.eos_token_id, austen_tokenizer.pad_token_id) == (0, 1)
    # Learned merges compress English well below one token per byte.
    held_out = austen_splits()["validation"]["text"][:200]
    assert 2.0 < bytes_per_token(held_out, austen_tokenizer) < 6.0


def test_train_tokenizer_rejects_tiny_vocabulary():
    with pytest.raises(ValueError, match="`vocab_size` must be an integer of at least 258"):
        train_tokenizer(["some text"], vocab_size=100)


def test_saved_tokenizer_reloads_with_identical_ids(austen_tokenizer, tmp_path):
    austen_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "\n\n".join(austen_splits()["validation"]["text"][:50]) + "".join(UNICODE_SAMPLES)
    expected = austen_tokenizer(sample)["input_ids"]
    assert reloaded(sample)["input_ids"] == expected
    assert get_tokenizer(tmp_path)(sample)["input_ids"] == expected
    assert reloaded.get_vocab() == austen_tokenizer.get_vocab()
    assert (reloaded.eos_token, reloaded.pad_token, reloaded.unk_token) == ("<|endoftext|>", "<|pad|>", None)
    assert reloaded.decode(expected) == sample


def test_get_tokenizer_caches_the_austen_tokenizer(tmp_path):
    trained = get_tokenizer(None, vocab_size=300, cache_dir=tmp_path)
    assert (tmp_path / "austen-bpe-300" / "tokenizer.json").is_file()
    cached = get_tokenizer(None, vocab_size=300, cache_dir=tmp_path)
    assert cached.get_vocab() == trained.get_vocab()
    with pytest.raises(ValueError, match="`path` must be a folder written by `tokenizer.save_pretrained`"):
        get_tokenizer(tmp_path / "missing")


def _write_text_files(folder, paragraphs_per_file=15, files=3):
    folder.mkdir()
    expected = set()
    for file_index in range(files):
        paragraphs = [
            f"File {file_index}, paragraph {index}.\nIt wraps onto a second line."
            for index in range(paragraphs_per_file)
        ]
        expected.update(paragraphs)
        # Extra blank lines between paragraphs must not create empty rows.
        (folder / f"part{file_index}.txt").write_text("\n\n\n".join(paragraphs) + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file, must be ignored", encoding="utf-8")
    return expected


def test_load_text_dataset_from_directory_of_text_files(tmp_path):
    expected = _write_text_files(tmp_path / "corpus")
    cache_dir = str(tmp_path / "cache")
    splits = load_text_dataset(tmp_path / "corpus", validation_fraction=0.2, seed=3, cache_dir=cache_dir)
    assert set(splits) == {"train", "validation"}
    assert len(splits["validation"]) == 9  # 20% of 45 paragraphs
    assert set(splits["train"]["text"]) | set(splits["validation"]["text"]) == expected
    assert not set(splits["train"]["text"]) & set(splits["validation"]["text"])

    again = load_text_dataset(str(tmp_path / "corpus"), validation_fraction=0.2, seed=3, cache_dir=cache_dir)
    assert again["validation"]["text"] == splits["validation"]["text"]

    single_file = load_text_dataset(tmp_path / "corpus" / "part0.txt", text_column="content", cache_dir=cache_dir)
    assert single_file["train"].column_names == ["content"]
    assert len(single_file["train"]) + len(single_file["validation"]) == 15


def test_load_text_dataset_from_saved_datasets(tmp_path):
    train = Dataset.from_dict({"body": [f"train {index}" for index in range(20)]})
    validation = Dataset.from_dict({"body": ["held out"]})
    DatasetDict({"train": train, "validation": validation}).save_to_disk(tmp_path / "with_validation")
    splits = load_text_dataset(tmp_path / "with_validation", text_column="body")
    assert splits["validation"]["body"] == ["held out"]
    assert splits["train"]["body"] == train["body"]

    train.save_to_disk(tmp_path / "single")
    splits = load_text_dataset(tmp_path / "single", validation_fraction=0.25, text_column="body")
    assert (len(splits["train"]), len(splits["validation"])) == (15, 5)

    with pytest.raises(ValueError, match="`text_column` must name a column"):
        load_text_dataset(tmp_path / "single", text_column="text")


def test_load_text_dataset_defaults_to_austen():
    splits = load_text_dataset()
    assert set(splits["validation"]["novel"]) == {HELD_OUT_NOVEL}


@pytest.mark.parametrize("source", ["gpt2", "wikitext/wikitext-2-raw-v1", "/nonexistent/corpus", "EMPTY_DIR"])
def test_load_text_dataset_rejects_unknown_sources(source, tmp_path):
    if source == "EMPTY_DIR":
        source = str(tmp_path)
    with pytest.raises(ValueError, match=r"`source` must be 'austen' .*save_to_disk.*got"):
        load_text_dataset(source)


def test_load_text_dataset_rejects_bad_validation_fraction():
    with pytest.raises(ValueError, match="`validation_fraction` must be strictly between 0 and 1"):
        load_text_dataset("austen", validation_fraction=1.0)


def test_unigram_baseline_on_austen_beats_uniform(austen_tokenizer):
    splits = austen_splits()
    packed = DatasetDict({name: pack_dataset(split, austen_tokenizer, 128) for name, split in splits.items()})
    baseline = unigram_baseline(packed, len(austen_tokenizer))
    assert math.isfinite(baseline)
    # Zipfian token frequencies: well below the uniform log(V), but no unigram model gets near zero.
    assert 2.0 < baseline < math.log(len(austen_tokenizer)) - 0.5


def test_unigram_baseline_matches_hand_computation():
    packed = DatasetDict(
        {
            "train": Dataset.from_dict({"input_ids": [[0, 0, 1]]}),
            "validation": Dataset.from_dict({"input_ids": [[2, 1, 1]]}),
        }
    )
    # Add-one counts over 3 ids: [3, 2, 1] / 6; the first validation token is never predicted.
    assert unigram_baseline(packed, vocab_size=3) == pytest.approx(-math.log(2 / 6))
    with pytest.raises(ValueError, match="`vocab_size` must exceed every token id"):
        unigram_baseline(packed, vocab_size=2)
    with pytest.raises(ValueError, match="must have a non-empty 'validation' split"):
        unigram_baseline(DatasetDict({"train": packed["train"]}), vocab_size=3)


def test_bits_per_byte_arithmetic():
    assert bits_per_byte(math.log(2), n_tokens=10, n_bytes=10) == pytest.approx(1.0)
    assert bits_per_byte(2.0, n_tokens=100, n_bytes=400) == pytest.approx(0.5 / math.log(2))
    with pytest.raises(ValueError, match="`n_tokens` and `n_bytes` must be positive"):
        bits_per_byte(1.0, n_tokens=0, n_bytes=10)


def test_count_tokens_and_bytes(austen_tokenizer):
    texts = ["é", "ab", "🎉"]
    n_tokens, n_bytes = count_tokens_and_bytes(texts, austen_tokenizer, batch_size=2)
    assert n_bytes == 2 + 2 + 4
    n_tokens_without_eos, _ = count_tokens_and_bytes(texts, austen_tokenizer, add_eos=False)
    assert n_tokens == n_tokens_without_eos + len(texts)
    assert n_tokens_without_eos == sum(len(austen_tokenizer(text)["input_ids"]) for text in texts)


def test_tokenizer_cli_trains_and_saves(tmp_path):
    _write_text_files(tmp_path / "corpus", paragraphs_per_file=30)
    output = tmp_path / "tokenizer"
    exit_code = main_train_tokenizer(
        ["--output", str(output), "--vocab-size", "300", "--source", str(tmp_path / "corpus"), "--min-frequency", "1"]
    )
    assert exit_code == 0
    reloaded = AutoTokenizer.from_pretrained(output)
    assert len(reloaded) == 300
    assert reloaded.decode(reloaded("File 7, paragraph 3.")["input_ids"]) == "File 7, paragraph 3."


def test_tokenizer_arguments_work_as_a_subcommand(tmp_path):
    parser = argparse.ArgumentParser(prog="ctm")
    subcommands = parser.add_subparsers(dest="command", required=True)
    add_tokenizer_arguments(subcommands.add_parser("tokenizer"))
    args = parser.parse_args(["tokenizer", "--output", str(tmp_path / "tok"), "--vocab-size", "300"])
    assert (args.source, args.vocab_size) == ("austen", 300)
    assert run_tokenizer_command(args) == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 300
