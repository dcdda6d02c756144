"""Mechanics of eval/introspection_probes.py and eval/introspection_features.py: the metric helpers, the temperature
fit and the marker's control on known inputs, the per-token table against the model's own outputs, and the --quick
smoke run end to end. The headline numbers need the full run (`python eval/introspection_probes.py --seeds 3`)."""

import json
import math

import introspection_probes as probes  # eval/ is on the path (pyproject.toml: pytest pythonpath)
import numpy
import pytest
import torch
from introspection_features import token_table
from tiny import tiny_model

from modeling_ctm.confidence_ctm import token_confidence


def test_metrics_on_known_inputs():
    correct = numpy.array([1, 1, 1, 0] * 25, dtype=float)
    calibrated = probes.metrics(numpy.full(100, 0.75), correct, 15)
    assert calibrated["ece"] == pytest.approx(0.0) and calibrated["brier"] == pytest.approx(0.1875)
    assert math.isclose(calibrated["auroc"], 0.5)  # one constant score ranks nothing
    separated = probes.metrics(numpy.where(correct == 1, 0.9, 0.2), correct, 15)
    assert separated["auroc"] == pytest.approx(1.0)
    # overconfident by 0.2 on every token
    assert probes.metrics(numpy.full(100, 0.95), correct, 15)["ece"] == pytest.approx(0.2)


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 5, generator=generator)
    targets = torch.multinomial(torch.softmax(logits / 2.0, dim=-1), 1, generator=generator)[:, 0]
    assert probes.fit_temperature(logits, targets) == pytest.approx(2.0, rel=0.1)


def test_marker_control_flags_as_many_answers_by_lowest_maxprob():
    correct = numpy.array([1, 1, 0, 0, 1, 0], dtype=float)
    conf = {"head": numpy.array([0.9, 0.8, 0.1, 0.4, 0.3, 0.7]), "maxprob": numpy.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3])}
    report = probes.marker_report(conf, correct, threshold=0.5)
    assert report["flag_rate"] == pytest.approx(0.5)  # 0.1, 0.4, 0.3
    assert report["head"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3)}
    # the control flags the three lowest max-probabilities: rows 0 (right), 2 (wrong), 5 (wrong)
    assert report["maxprob_same_rate"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3)}


def test_token_table_matches_the_model():
    model = tiny_model(ctm_layers="last")
    ids = torch.randint(1, 97, (3, 8))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2] = False
    table = token_table(model, ids, mask, ids[:, 1:])
    assert len(table["correct"]) == 20
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    torch.testing.assert_close(table["logits"], logits[mask], atol=1e-5, rtol=1e-4)
    _, features = token_confidence(model, ids)
    torch.testing.assert_close(table["head_features"], features[:, :-1][mask], atol=1e-5, rtol=1e-4)
    assert table["ticks"].shape == (20, 3 + 3) and table["sync_per_tick"].shape == (20, 3, 16)


@pytest.mark.experiment
def test_quick_run_writes_every_arm(tmp_path):
    probes.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for name in ("text", "chain"):
        assert set(saved[name]["arms"]) == set(probes.ARMS)
        for arm in probes.ARMS:
            assert set(saved[name]["arms"][arm]) == {"auroc", "ece", "brier"}
            assert math.isfinite(saved[name]["arms"][arm]["brier"]["mean"])
        assert {"head", "maxprob_same_rate", "flag_rate"} <= set(saved[name]["marker"])
    assert (tmp_path / "results.md").is_file()
    assert (tmp_path / "reliability.png").is_file() and (tmp_path / "auroc_per_tick.png").is_file()


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def facts_checkpoint(folder):
    """A tiny random Llama converted in-process and saved with a ChatML byte-level BPE tokenizer trained on the facts
    world's words (so its names and values are one token, as the protocol needs)."""
    from facts_world import RELATIONS, SUBJECTS, sentence
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_ctm import CTMForCausalLM
    from modeling_ctm.training.tokenization import train_tokenizer

    words = SUBJECTS + [v for spec in RELATIONS.values() for v in spec[0].split()]
    texts = [f"{w}\n {w} {w}." for w in words] * 6 + [
        sentence({"subject": s, "relation": r, "value": spec[0].split()[0], "template": t})
        for s in SUBJECTS[:4] for r, spec in RELATIONS.items() for t in range(5)
    ] * 3  # fmt: skip
    tokenizer = train_tokenizer(texts, vocab_size=1500)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    CTMForCausalLM.from_llama(LlamaForCausalLM(config).eval()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.experiment
def test_real_facts_runs_quick_on_a_converted_tiny_llama_and_merges_beside_other_data_sets(tmp_path):
    checkpoint = facts_checkpoint(tmp_path / "llama")
    out = tmp_path / "facts"
    probes.main(["--quick", "--out", str(out), "--set", "datasets=real_facts", "--set", f"real_checkpoint={checkpoint}"])
    saved = json.loads((out / "results.json").read_text())
    no_ticks = {"maxprob", "maxprob_ts", "entropy", "margin", "probe_residual", "probe_residual+maxprob", "head"}
    assert set(saved["real_facts"]["arms"]) == no_ticks
    for arm in no_ticks:
        assert set(saved["real_facts"]["arms"][arm]) == {"auroc", "ece", "brier"}
        assert math.isfinite(saved["real_facts"]["arms"][arm]["brier"]["mean"])
    # 4 subjects x 3 relations, each asked 4 ways (efficacy + 3 paraphrases), told and untold
    assert sum(saved["per_seed"][0]["real_facts"][k] for k in ("tokens_fit", "tokens_test")) == 4 * 3 * 4 * 2
    assert {"accuracy_test_told", "accuracy_test_untold"} <= set(saved["real_facts"])
    # an earlier run holding another data set keeps its numbers when real_facts is merged into it
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    text = json.dumps(saved).replace('"real_facts', '"real_text')
    (earlier / "results.json").write_text(text)
    probes.merge_results(saved, earlier)
    merged = json.loads((earlier / "results.json").read_text())
    assert merged["settings"]["datasets"] == "real_text,real_facts"
    assert merged["real_text"] == json.loads(text)["real_text"]
    assert merged["real_facts"]["arms"] == saved["real_facts"]["arms"]
    assert {f"real_facts:{arm}" for arm in no_ticks} | {f"real_text:{arm}" for arm in no_ticks} == set(merged["arms"])
    assert "real_facts" in (earlier / "results.md").read_text()
