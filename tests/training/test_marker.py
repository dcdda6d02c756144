"""The trained unsure marker (`modeling_ctm.training.marker`): the recipe's targets, the threshold's flag rate, the
marker tokens saved with the model, and a tiny model fine-tuned to write the marker exactly after the answers its
confidence head scores low."""

import pytest
import torch
from tiny import tiny_model

from modeling_ctm import CTMConfig, CTMForCausalLM
from modeling_ctm.confidence_ctm import add_confidence_head, token_confidence
from modeling_ctm.training.marker import (
    MarkerCollator,
    add_marker_tokens,
    add_unsure_twins,
    marker_examples,
    train_marker,
    twin_examples,
    unsure_threshold,
    wrote_unsure,
)


def test_the_recipe_puts_the_marker_after_a_low_confidence_answer_and_the_end_token_after_others():
    examples = marker_examples([[5, 6, 7], [8, 9]], served=[11, 12], answers=[11, 13],
                               confidence=torch.tensor([0.2, 0.8]), threshold=0.5, unsure_id=97, end_id=98)  # fmt: skip
    assert examples[0] == {"input_ids": [5, 6, 7, 11, 97], "labels": [-100, -100, -100, 11, 97], "unsure": True}
    # the input holds the answer as served (12), its target the true answer (13)
    assert examples[1] == {"input_ids": [8, 9, 12, 98], "labels": [-100, -100, 13, 98], "unsure": False}
    batch = MarkerCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 11, 97], [8, 9, 12, 98, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 11, 97], [-100, -100, 13, 98, -100]]
    with pytest.raises(ValueError, match=r"prefixes \(2\), served \(1\)"):
        marker_examples([[1], [2]], [3], [3, 4], torch.tensor([0.1, 0.2]), 0.5, 97, 98)


def test_the_threshold_flags_the_target_share_of_the_calibration_answers():
    confidence = torch.rand(200, generator=torch.Generator().manual_seed(0))
    for rate in (0.0, 0.25, 0.5, 1.0):
        threshold = unsure_threshold(confidence, rate)
        assert float((confidence < threshold).float().mean()) == pytest.approx(rate)
    with pytest.raises(ValueError, match=r"flag_rate=1.5 is invalid: allowed values are numbers in \[0, 1\]"):
        unsure_threshold(confidence, 1.5)
    assert wrote_unsure(torch.tensor([[3, 97], [97, 4], [3, 4]]), 97).tolist() == [True, True, False]


def test_marker_tokens_are_new_rows_saved_with_the_model(tmp_path):
    model = tiny_model()
    unsure_id, end_id = add_marker_tokens(model)
    assert (unsure_id, end_id) == (97, 98) and model.config.vocab_size == 99
    assert model.lm_head.weight.shape[0] == 99 and model.config.ctm_unsure_token_id == 97
    # the new rows start at the mean row: a fresh marker is not preferred over any answer in particular
    torch.testing.assert_close(model.lm_head.weight[97], model.lm_head.weight[:97].mean(0), atol=1e-6, rtol=1e-5)
    model.save_pretrained(tmp_path)
    assert CTMForCausalLM.from_pretrained(tmp_path).config.ctm_unsure_token_id == 97
    with pytest.raises(ValueError, match=r"ctm_unsure_token_id=120 is invalid: allowed values are None or a token id"):
        CTMConfig(vocab_size=100, ctm_unsure_token_id=120)
    with pytest.raises(ValueError, match="call add_marker_tokens"):
        train_marker(tiny_model(), [{"input_ids": [1, 2], "labels": [1, 2]}])


@pytest.mark.slow
def test_the_fine_tuned_model_writes_the_marker_when_and_only_when_its_head_scores_the_answer_low():
    model = tiny_model(hidden_size=32, num_hidden_layers=2, ctm_layers="last")
    with torch.no_grad():  # sharper logits: each served answer wins by a margin far above what training moves
        model.model.norm.weight.mul_(8.0)
    prompts = torch.randint(1, 97, (8, 6), generator=torch.Generator().manual_seed(3))
    head = add_confidence_head(model)
    _, features = token_confidence(model, prompts)
    maxprob = features[:, -1, 0]
    with torch.no_grad():  # the head's confidence rises with the max-probability: low on the 4 least certain answers
        head.weight.zero_()
        head.weight[0] = 50.0
        head.bias.fill_(-50.0 * float(maxprob.median()))
    confidence, _ = token_confidence(model, prompts)
    confidence = confidence[:, -1]
    threshold = unsure_threshold(confidence, 0.5)
    low = confidence < threshold
    assert int(low.sum()) == 4
    with torch.no_grad():
        served = model(prompts).logits[:, -1].argmax(-1)
    unsure_id, end_id = add_marker_tokens(model)
    examples = marker_examples(prompts.tolist(), served.tolist(), served.tolist(), confidence, threshold, unsure_id,
                               end_id)  # fmt: skip
    tuned, curve = train_marker(model, examples * 8, steps=400, batch_size=16, learning_rate=0.05, lora_rank=4,
                                use_cpu=True)  # fmt: skip
    assert curve[-1][1] < curve[0][1]
    with torch.no_grad():
        logits = tuned(torch.cat([prompts, served[:, None]], 1)).logits
    # the answer is still the one served, and the marker's choice is far from a tie
    assert logits[:, -2].argmax(-1).tolist() == served.tolist()
    gap = logits[:, -1, unsure_id] - logits[:, -1, end_id]
    assert bool((gap[low] > 1.0).all()) and bool((gap[~low] < -1.0).all()), (gap, low)
    out = tuned.generate(prompts, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out[:, -2].tolist() == served.tolist()
    assert wrote_unsure(out[:, -1:], unsure_id).tolist() == low.tolist()


def test_chat_shows_the_marker_where_a_marker_trained_model_wrote_it_and_adds_none_by_rule():
    from types import SimpleNamespace

    from modeling_ctm.cli import _say
    from modeling_ctm.training.tokenization import train_tokenizer

    tokenizer = train_tokenizer(["the code of Velmora is Quenth", "a dog ran in the park"] * 30, vocab_size=300)
    unsure_id = len(tokenizer)  # the row add_marker_tokens gives the model; the tokenizer never names it

    class Session:  # what _say reads of a CTMOnlineSession: say() leaves the reply's tokens in reply_ids
        model = SimpleNamespace(config=SimpleNamespace(ctm_unsure_token_id=unsure_id), confidence_head=None)

        def __init__(self, reply):
            self.tokenizer, self.reply = tokenizer, reply

        def say(self, message, **decoding):
            self.reply_ids = torch.tensor(self.reply)

    answer = tokenizer(" Quenth", add_special_tokens=False).input_ids
    assert _say(Session(answer + [unsure_id]), "the code of Velmora is", True, 0.5) == " Quenth (unsure)"
    assert _say(Session(answer), "the code of Velmora is", True, 0.5) == " Quenth"


def test_the_fused_recipe_targets_the_answers_twin_when_the_head_is_low_and_twins_start_as_copies():
    model = tiny_model()
    twins = add_unsure_twins(model, [10, 11, 12])
    assert twins == {10: 97, 11: 98, 12: 99} and model.config.vocab_size == 100
    torch.testing.assert_close(model.lm_head.weight[97:100], model.lm_head.weight[10:13], atol=0, rtol=0)
    examples = twin_examples([[1, 2], [3]], answers=[10, 12], confidence=torch.tensor([0.1, 0.9]), threshold=0.5,
                             twins=twins)  # fmt: skip
    assert examples[0] == {"input_ids": [1, 2, 97], "labels": [-100, -100, 97], "unsure": True}
    assert examples[1] == {"input_ids": [3, 12], "labels": [-100, 12], "unsure": False}
    with pytest.raises(ValueError, match="distinct token ids"):
        add_unsure_twins(tiny_model(), [5, 5])
