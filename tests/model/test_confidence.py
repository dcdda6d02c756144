"""The confidence head: saved and loaded with the model, read through generate as through the full forward, fitted
with a Brier loss, and the unsure marker it drives."""

import pytest
import torch
from helpers.processes import run_without_the_package
from tiny import tiny_model

from modeling_ctm import CTMConfig, CTMForCausalLM
from modeling_ctm.confidence_ctm import (
    add_confidence_head,
    confidence_feature_names,
    mark_unsure,
    mark_words,
    token_confidence,
)
from modeling_ctm.training.confidence import fit_confidence_head


def fitted_model(**overrides) -> CTMForCausalLM:
    """A tiny model whose head is fitted to a made-up target, so its confidence varies from token to token."""
    model = tiny_model(**overrides)
    add_confidence_head(model)
    ids = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    _, features = token_confidence(model, ids)
    target = (features[..., 0] > features[..., 0].median()).float()  # "right" where the max-probability is high
    fit_confidence_head(model.confidence_head, features, target)
    return model


def test_a_fresh_head_says_one_half_and_a_model_without_one_is_unchanged():
    plain = tiny_model()
    headed = tiny_model(ctm_confidence_head="linear")
    assert plain.confidence_head is None
    ids = torch.randint(1, 97, (2, 6))
    confidence, features = token_confidence(headed, ids)
    torch.testing.assert_close(confidence, torch.full((2, 6), 0.5), atol=0, rtol=0)
    assert features.shape == (2, 6, len(confidence_feature_names(headed.config)))
    # the head changes nothing the model computes
    torch.testing.assert_close(headed(ids).logits, plain(ids).logits, atol=1e-6, rtol=1e-5)


def test_the_head_round_trips_through_save_pretrained(tmp_path):
    model = fitted_model()
    model.save_pretrained(tmp_path)
    loaded = CTMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.ctm_confidence_head == "linear"
    torch.testing.assert_close(loaded.confidence_head.weight, model.confidence_head.weight, atol=0, rtol=0)
    ids = torch.randint(1, 97, (2, 9))
    before, _ = token_confidence(model, ids)
    after, _ = token_confidence(loaded, ids)
    assert float(before.std()) > 1e-3  # a head that varies, or the comparison shows nothing
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_a_checkpoint_without_a_head_loads_without_one(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = CTMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.confidence_head is None and loaded.config.ctm_confidence_head == "none"
    ids = torch.randint(1, 97, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(ctm_carry="chunk", ctm_chunk_size=2), dict(ctm_layers="none")])
def test_generate_confidence_equals_the_full_forward(overrides):
    model = fitted_model(**overrides)
    prompt = torch.randint(1, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_confidence=True)  # fmt: skip
    assert out.confidence.shape == (2, 6)
    full, _ = token_confidence(model, out.sequences)
    # the position whose logits chose each new token; the fitted head's weights (features standardised for the fit,
    # then folded back) multiply the cached-vs-full rounding of its inputs, hence a looser bound than the logits'
    torch.testing.assert_close(out.confidence, full[:, 4:10], atol=1e-4, rtol=1e-3)
    assert float(full.std()) > 1e-3


def test_generate_confidence_follows_the_beams():
    model = fitted_model()
    out = model.generate(torch.randint(1, 97, (1, 5)), max_new_tokens=4, num_beams=3, do_sample=False,
                         return_dict_in_generate=True, output_confidence=True)  # fmt: skip
    full, _ = token_confidence(model, out.sequences)
    torch.testing.assert_close(out.confidence, full[:, 4:8], atol=1e-4, rtol=1e-3)


def test_output_confidence_needs_a_head_and_a_valid_config_field():
    with pytest.raises(ValueError, match="confidence head"):
        tiny_model().generate(torch.randint(1, 97, (1, 3)), max_new_tokens=2, return_dict_in_generate=True,
                              output_confidence=True)  # fmt: skip
    with pytest.raises(ValueError, match="ctm_confidence_head"):
        CTMConfig(ctm_confidence_head="mlp")


def test_the_brier_fit_learns_a_signal_and_is_calibrated():
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(4000, generator=generator)
    truth = torch.sigmoid(2 * signal)
    correct = (torch.rand(4000, generator=generator) < truth).float()
    features = torch.stack([signal, torch.randn(4000, generator=generator)], 1)  # one informative, one noise
    head = add_confidence_head(tiny_model(ctm_layers="none"))
    head.weight = torch.nn.Parameter(torch.zeros(2))  # a two-feature head for the synthetic problem
    report = fit_confidence_head(head, features, correct)
    assert report["brier_after"] < report["brier_before"] - 0.02
    with torch.no_grad():
        predicted = head(features)
    # the fitted probability tracks the true one (a Brier fit is calibrated on its own distribution)
    assert float((predicted - truth).abs().mean()) < 0.05
    with pytest.raises(ValueError, match="columns"):
        fit_confidence_head(head, torch.zeros(3, 5), torch.zeros(3))


@pytest.mark.parametrize("confidence", [0.0, 0.29, 0.3, 0.31, 0.9])
def test_the_marker_appears_only_below_the_threshold(confidence):
    marked = mark_unsure("Paris", confidence, threshold=0.3)
    assert (marked == "Paris (unsure)") == (confidence < 0.3)
    assert marked in ("Paris", "Paris (unsure)")


def test_the_marker_rejects_a_threshold_outside_0_1():
    with pytest.raises(ValueError, match="threshold"):
        mark_unsure("x", 0.5, threshold=1.5)


def test_mark_words_marks_the_words_holding_an_unsure_token():
    pieces = ["The", " cap", "ital", " is", " Paris", "."]
    assert mark_words(pieces, [0.9, 0.9, 0.2, 0.9, 0.1, 0.9], 0.5) == "The [capital?] is [Paris.?]"
    assert mark_words(pieces, [0.9] * 6, 0.5) == "The capital is Paris."
    with pytest.raises(ValueError, match="equally long"):
        mark_words(pieces, [0.9], 0.5)


@pytest.mark.parametrize("bias, marked", [(-10.0, True), (10.0, False)])
def test_chat_show_confidence_marks_words_only_below_the_threshold(tmp_path, capsys, bias, marked):
    from modeling_ctm.cli import main
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the code of Velmora is Quenth", "a dog ran in the park"] * 30, vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), ctm_carry="chunk", ctm_chunk_size=4, max_position_embeddings=256)
    head = add_confidence_head(model)
    with torch.no_grad():
        head.bias.fill_(bias)  # sigmoid(-10) ~ 0: every token unsure; sigmoid(10) ~ 1: none
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["chat", str(tmp_path / "model"), "--message", "the code of Velmora is", "--show-confidence"]
    assert main(argv) == 0
    reply = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ctm> "))
    assert reply.endswith(" (unsure)") == marked
    assert ("?]" in reply) == marked


def test_init_weights_fills_a_missing_head():
    """Built on the meta device, a head the checkpoint lacks comes out of `_init_weights`: zero, i.e. 0.5."""
    from tiny import tiny_config

    model = CTMForCausalLM.from_pretrained(None, config=tiny_config(ctm_confidence_head="linear"), state_dict={})
    assert model.confidence_head.weight.device.type == "cpu"
    assert torch.count_nonzero(model.confidence_head.weight) == 0 and float(model.confidence_head.bias.detach()) == 0.0


@pytest.mark.slow
def test_remote_code_generates_the_same_confidence_without_the_package(tmp_path):

    from safetensors.torch import save_file

    model = fitted_model()
    model.save_pretrained(tmp_path / "ckpt")
    prompt = torch.randint(1, 97, (1, 5))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_confidence=True)  # fmt: skip
    save_file({"prompt": prompt, "confidence": out.confidence.contiguous()}, str(tmp_path / "expected.safetensors"))
    run_without_the_package(
        f"""
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        out = model.generate(expected["prompt"], max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_confidence=True)
        torch.testing.assert_close(out.confidence, expected["confidence"], atol=1e-5, rtol=1e-4)
        print("REMOTE_OK")
        """,
        tmp_path,
    )
