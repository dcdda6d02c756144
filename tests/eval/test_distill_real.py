"""eval/distill_real.py end to end (`--quick`) on a tiny converted-style base with a word-level tokenizer built here:
every arm is scored, `base` is its own reference, and training moves the block away from the base."""

import sys
from pathlib import Path

import pytest
from tiny import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modeling_ctm.training.data import austen_splits


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import distill_real  # noqa: E402


@pytest.fixture
def base_folder(tmp_path):
    texts = austen_splits()["train"].select(range(400))["text"]
    counts = {}
    for text in texts:
        for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(counts, key=counts.get, reverse=True)[:200]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    folder = tmp_path / "base"
    tiny_model(vocab_size=len(tokenizer), ctm_layers="none").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_quick_run_scores_every_arm_against_the_base(tmp_path, base_folder):
    result = distill_real.main(
        ["--model", str(base_folder), "--seeds", "1", "--quick", "--out", str(tmp_path / "out")]
    )
    arms = result["arms"]
    assert set(arms) == set(distill_real.ARMS)
    assert arms["base"]["ce_minus_base"]["mean"] == 0.0
    assert arms["base"]["kl_to_base"]["mean"] < 1e-6  # the exact start is the base
    for arm in ("lm", "lm_distill"):
        assert arms[arm]["block_to_residual"]["mean"] > 1e-3  # the gated block received gradient and now adds something
    # the KL alone has zero gradient at the exact start (its minimum): the model stays at the base
    assert arms["distill"]["kl_to_base"]["mean"] < 1e-6
    assert all(arms[arm]["train_tokens_per_s"]["mean"] > 0.0 for arm in ("lm", "distill", "lm_distill"))
    assert (tmp_path / "out" / "results.md").read_text().count("| lm") == 2
