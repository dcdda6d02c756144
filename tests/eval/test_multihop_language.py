"""The multi-hop natural-language task: the generator hides surface cues, the cached right-padded scoring equals the
full model on each prompt alone, and the experiment runs end to end (`--quick`) on a tiny model with a word-level
chat tokenizer built here (no download)."""

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import multihop_language as mh  # noqa: E402
import multihop_problems as mp  # noqa: E402


FACT = re.compile(r"^(?:(\w+)'s (\w+) is (\w+)|The (\w+) of (\w+) is (\w+)|(\w+) is (\w+)'s (\w+))$")


def parse(problem):
    """(successor map, asked name, hops) read back from the problem's text."""
    text = problem["messages"][1]["content"]
    body, question = text.rsplit(" Who is ", 1)
    successor = {}
    for fact in body.split(". "):
        m = FACT.match(fact.rstrip("."))
        assert m, fact
        g = m.groups()
        a, b = (g[0], g[2]) if g[0] else (g[4], g[5]) if g[3] else (g[7], g[6])
        if "'s" in a:  # the composed sentence
            continue
        successor[a] = b
    asked = question.split("'s")[0]
    return successor, asked, question.count("'s")


@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_the_answer_is_k_hops_away_and_no_name_stands_out(hops):
    rng = random.Random(hops)
    for _ in range(20):
        problem = mp.make_problem(rng, hops)
        successor, asked, k = parse(problem)
        assert k == hops
        answer = asked
        for _ in range(hops):
            answer = successor[answer]
        assert answer == problem["answer"] != asked
        assert set(problem["candidates"]) == set(successor) - {asked} and len(problem["candidates"]) == 9
        facts = problem["messages"][1]["content"].rsplit(" Who is ", 1)[0]
        counts = Counter(word for word in re.findall(r"\w+", facts) if word in mp.NAMES)
        assert len(counts) == 10 and set(counts.values()) == {2}  # every name: once a subject, once an object


def test_the_answer_is_not_where_the_candidates_are_not():
    """Order the candidates by where they are first (and last) mentioned: the answer's rank is uniform over 1..9
    (mean 5, sd of the mean over 300 problems ~0.15), so position in the text gives nothing away."""
    rng = random.Random(0)
    for hops in (1, 2, 4):
        first, last = [], []
        for _ in range(300):
            problem = mp.make_problem(rng, hops)
            words = re.findall(r"\w+", problem["messages"][1]["content"].rsplit(" Who is ", 1)[0])
            by_first = sorted(problem["candidates"], key=words.index)
            by_last = sorted(problem["candidates"], key=lambda n: len(words) - words[::-1].index(n))
            first.append(by_first.index(problem["answer"]) + 1)
            last.append(by_last.index(problem["answer"]) + 1)
        assert 4.4 < sum(first) / len(first) < 5.6 and 4.4 < sum(last) / len(last) < 5.6, (hops, first, last)


def test_bad_arguments_are_refused():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="hops=5"):
        mp.make_problem(rng, 5)
    with pytest.raises(ValueError, match="form='single'"):
        mp.make_problem(rng, 1, "single")


def word_tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    texts = [
        mp.make_problem(rng, k, f)["messages"][1]["content"] for k in (1, 2, 3, 4) for f in mp.FORMS for _ in range(30)
    ]
    words = {w for t in texts + [mp.SYSTEM, "<|system|> <|user|> <|assistant|> So is"] + list(mp.NAMES)
             for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)}  # fmt: skip
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def test_cached_right_padded_answer_logits_equal_each_prompt_run_alone(tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), ctm_layers=[1], ctm_mlp="keep", max_position_embeddings=256)
    for p in model.parameters():
        p.requires_grad_(False)
    items = mh.problems(0, (1, 3), 2)
    encoded = mh.encode(items, tokenizer)
    assert len(set(encoded["position"].tolist())) > 1  # the rows really are padded differently
    cache = mh.TrunkCache.build(model, encoded["input_ids"], tmp_path, start_layer=1)
    stream = torch.stack([cache[i]["trunk_hidden"] for i in range(len(cache))])
    logits = mh.answer_logits(model, stream, encoded["position"], 1)  # (B, K, V)
    for row, position in enumerate(encoded["position"].tolist()):
        alone = model.model(encoded["input_ids"][row : row + 1, : position + 1]).tick_hidden_states[0, -1]
        torch.testing.assert_close(logits[row], model.lm_head(alone), atol=1e-5, rtol=1e-5)


def test_quick_run_writes_every_arm(tmp_path):
    tokenizer = word_tokenizer()
    folder = tmp_path / "base"
    tiny_model(vocab_size=len(tokenizer), ctm_layers="none", max_position_embeddings=256).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = mh.main(["--model", str(folder), "--seeds", "1", "--quick", "--out", str(tmp_path / "out")])
    assert set(result["arms"]) == set(mh.ARMS)
    for arm, metrics in result["arms"].items():
        assert set(metrics["accuracy"]) == {"k=1", "k=2", "k=3", "k=4"}
        assert all(0.0 <= v["mean"] <= 1.0 for v in metrics["accuracy"].values())
    assert result["per_seed"][0]["arms"]["k4"]["trainable_parameters"] > 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["positive_control"]["composed"]["accuracy"].keys() == {"k=1", "k=2", "k=3", "k=4"}
    assert "| k4_test_k8 | accuracy |" in (tmp_path / "out" / "results.md").read_text()


def test_the_prefilled_reply_ends_where_the_name_comes():
    tokenizer = word_tokenizer()
    items = mh.problems(0, (2,), 3)
    bare, prefilled = mh.encode(items, tokenizer), mh.encode(items, tokenizer, "prefilled")
    for row, problem in enumerate(items):
        words = tokenizer.decode(prefilled["input_ids"][row, : prefilled["position"][row] + 1]).split()
        asked = problem["path"].split("'")[0]
        assert words[-1] == "is" and words[-3 - 3 * problem["hops"] : -1][:2] == ["So", asked], words[-12:]
        assert prefilled["position"][row] > bare["position"][row]
    with pytest.raises(ValueError, match="reply='free'"):
        mh.encode(items, tokenizer, "free")


@pytest.mark.parametrize("separator", ["space", "line"])
def test_the_fixed_template_states_every_fact_in_one_order(separator):
    rng = random.Random(3)
    for hops in (1, 2, 3):
        problem = mp.make_problem(rng, hops, template="fixed", separator=separator)
        text = problem["messages"][1]["content"]
        facts = re.split(r"(?<=\.)" + mp.SEPARATORS[separator], text)[:-1]
        assert len(facts) == 10 and all(re.fullmatch(r"\w+'s \w+ is \w+\.", f) for f in facts), facts
        successor, asked, k = parse({"messages": [None, {"content": " ".join(facts) + " Who is " + problem["path"]}]})
        answer = asked
        for _ in range(k):
            answer = successor[answer]
        assert answer == problem["answer"] and k == hops
    with pytest.raises(ValueError, match="template='sorted'"):
        mp.make_problem(rng, 1, template="sorted")


def test_the_stem_reply_asks_with_the_question_turned_into_the_answers_start():
    tokenizer = word_tokenizer()
    items = mh.problems(0, (2,), 3)
    stem = mh.encode(items, tokenizer, "stem")
    for row, problem in enumerate(items):
        words = tokenizer.decode(stem["input_ids"][row, : stem["position"][row] + 1]).split()
        assert words[-1] == "is" and words[-2 - 3 * problem["hops"]] == problem["path"].split("'")[0], words[-10:]


def test_the_wider_mlp_arm_starts_at_the_base_and_matches_k4s_flops():
    tokenizer = word_tokenizer()
    base = tiny_model(vocab_size=len(tokenizer), ctm_layers="none", max_position_embeddings=256)
    mh.freeze_for_thinking_all(base)
    wide = mh.build_arm("mlp_iso_flops", base, seq_len=40)
    ids = mh.encode(mh.problems(0, (1,), 2), tokenizer)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)
    extra = wide.model.layers[-1].mlp.gate_proj.out_features
    d = base.config.hidden_size
    config = mh.CTMConfig(**{**base.config.to_dict(), "ctm_layers": "last", "ctm_mlp": "keep", "ctm_ticks": 4,
                             **mh.BLOCK_FIELDS})  # fmt: skip
    block = sum(mh.ctm_block_flops(config, 40, readout_every_tick=True).values())
    assert abs(6 * d * extra - block) <= 3 * d  # rounded to a whole unit
    trainable = {n for n, p in wide.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(f"model.layers.{base.config.num_hidden_layers - 1}.mlp.") for n in trainable)
